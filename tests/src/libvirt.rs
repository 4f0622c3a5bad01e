//! Real libvirtd on the test hosts: each host gets its own `libvirtd`
//! inside the host's network namespace and a mount namespace of its own,
//! whose `/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`,
//! `/var/cache/libvirt` and `/var/log/libvirt` are directories of the bed
//! (so two libvirtds on one machine never see each other's domains), and
//! the database VM as a libvirt domain (TCG, RAM in a shared file).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{DbBed, MariadbGuest, Testbed, Vm, VmProcess};

/// The QEMU wrapper the test domains name as their emulator: QEMU 7.2's
/// multi-threaded TCG loses dirty pages (see the design notes), and libvirt
/// 9.0 has no setting for TCG's threads, so `-accel tcg` becomes
/// `-accel tcg,thread=single`. Test-only: on KVM hosts there is nothing to
/// change.
const TCG_SINGLE: &str = r#"#!/bin/sh
n=$#
prev=
for a in "$@"; do
  if [ "$prev" = "-accel" ] && [ "$a" = "tcg" ]; then a="tcg,thread=single"; fi
  prev=$a
  set -- "$@" "$a"
done
shift "$n"
exec /usr/bin/qemu-system-x86_64 "$@"
"#;

/// One host's libvirtd.
pub struct LibvirtHost {
    /// Label (`src`, `dst`).
    pub label: String,
    /// Connection URI for virsh and the agents.
    pub uri: String,
    /// Its private directories.
    pub base: PathBuf,
    /// `memory_backing_dir`: where its domains' RAM files go.
    pub ram_dir: PathBuf,
    daemon: Child,
}

impl LibvirtHost {
    /// Starts a libvirtd in namespace `ns` with directories under the bed's.
    pub fn start(tb: &Testbed, ns: &str, label: &str) -> Result<Self> {
        if !Path::new("/usr/sbin/libvirtd").exists() {
            bail!("libvirtd is missing: run scripts/setup.sh (it installs libvirt-daemon-system)");
        }
        let base = tb.dir.join(format!("libvirt-{label}"));
        let ram_dir = tb.ram_dir.join(format!("{}-libvirt-{label}", tb.tag));
        for d in ["etc", "run", "lib", "cache", "log"] {
            std::fs::create_dir_all(base.join(d))?;
        }
        std::fs::create_dir_all(&ram_dir)?;
        std::fs::create_dir_all("/run/libvirt")?;
        crate::sh(&[
            "cp",
            "-a",
            "/etc/libvirt/.",
            &base.join("etc").to_string_lossy(),
        ])?;
        // No default network (it needs dnsmasq): the VMs use taps of the bed.
        let _ = std::fs::remove_dir_all(base.join("etc/qemu/networks/autostart"));
        let mut conf = std::fs::read_to_string(base.join("etc/qemu.conf"))?;
        conf.push_str(&format!(
            "\n# dbmigrate test host {label}\nuser = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\nstdio_handler = \"file\"\ncgroup_controllers = [ ]\nnamespaces = [ ]\nmemory_backing_dir = \"{}\"\n",
            ram_dir.display()
        ));
        std::fs::write(base.join("etc/qemu.conf"), conf)?;
        let mounts = [
            ("etc", "/etc/libvirt"),
            ("run", "/run/libvirt"),
            ("lib", "/var/lib/libvirt"),
            ("cache", "/var/cache/libvirt"),
            ("log", "/var/log/libvirt"),
        ]
        .iter()
        .map(|(d, at)| format!("mount --bind '{}' {at}", base.join(d).display()))
        .collect::<Vec<_>>()
        .join(" && ");
        let log = std::fs::File::create(base.join("libvirtd.log"))?;
        let daemon = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "unshare",
                "-m",
                "--propagation",
                "private",
            ])
            .args(["sh", "-c"])
            .arg(format!(
                "{mounts} && exec libvirtd -p /run/libvirt/libvirtd.pid"
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting libvirtd")?;
        let host = Self {
            label: label.into(),
            uri: format!(
                "qemu+unix:///system?socket={}",
                base.join("run/libvirt-sock").display()
            ),
            base,
            ram_dir,
            daemon,
        };
        let t = Instant::now();
        loop {
            if host
                .virsh(&["list", "--all"])
                .map(|o| o.status.success())
                .unwrap_or(false)
            {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!(
                    "libvirtd of {label} does not answer: {}",
                    std::fs::read_to_string(host.base.join("libvirtd.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(host)
    }

    /// `virsh -c URI args...`.
    pub fn virsh(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new("virsh")
            .args(["-q", "-c", &self.uri])
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// `virsh` that must succeed; its stdout.
    pub fn virsh_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.virsh(args)?;
        if !out.status.success() {
            bail!(
                "virsh {} on {}: {}",
                args.join(" "),
                self.label,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The domain's state (`running`, `paused`, `shut off`), None if
    /// libvirt does not know it.
    pub fn state(&self, name: &str) -> Result<Option<String>> {
        let names = self.virsh_ok(&["list", "--all", "--name"])?;
        if !names.lines().any(|l| l.trim() == name) {
            return Ok(None);
        }
        Ok(Some(self.virsh_ok(&["domstate", name])?.trim().to_string()))
    }

    /// Whether the domain has a persistent definition.
    pub fn persistent(&self, name: &str) -> Result<bool> {
        let info = self.virsh_ok(&["dominfo", name])?;
        Ok(info
            .lines()
            .any(|l| l.starts_with("Persistent:") && l.trim_end().ends_with("yes")))
    }

    /// The QEMU process of a running domain, from libvirt's pid file.
    pub fn qemu_pid(&self, name: &str) -> Result<u32> {
        let f = self.base.join(format!("run/qemu/{name}.pid"));
        let t = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(&f) {
                if let Ok(pid) = s.trim().parse() {
                    return Ok(pid);
                }
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("no pid file {} for domain {name}", f.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pattern of the RAM files libvirt gives domain `name`
    /// (`<memory_backing_dir>/libvirt/qemu/<id>-<name>/pc.ram`, or
    /// `ram-node<i>` per NUMA cell, the id changing at every start) for
    /// `DBMIGRATE_TRACK_PATH`.
    pub fn ram_pattern(&self, name: &str) -> String {
        format!("{}/libvirt/qemu/*-{name}/*", self.ram_dir.display())
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        if let Ok(names) = self.virsh_ok(&["list", "--name"]) {
            for n in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
                let _ = self.virsh(&["destroy", n]);
            }
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = std::fs::remove_dir_all(&self.ram_dir);
    }
}

/// The files of a VM as a libvirt domain on one host.
pub struct DomainFiles {
    /// Domain XML.
    pub xml: PathBuf,
    /// dbmigrate's QMP socket (the first `-qmp`).
    pub qmp: PathBuf,
    /// The test's QMP socket for events.
    pub events: PathBuf,
    /// Serial console log.
    pub serial: PathBuf,
    /// The guest agent's channel.
    pub hints: PathBuf,
}

/// The `<numa>` element of a domain with `cells` cells sharing `ram_mib`
/// (none for one cell); the vCPU is in cell 0.
fn numa_cells(cells: u32, ram_mib: u64) -> String {
    if cells <= 1 {
        return String::new();
    }
    let each = ram_mib / u64::from(cells);
    let cell = |i: u32| {
        let cpus = if i == 0 { " cpus='0'" } else { "" };
        format!("<cell id='{i}'{cpus} memory='{each}' unit='MiB'/>")
    };
    format!("<numa>{}</numa>", (0..cells).map(cell).collect::<String>())
}

/// A domain's memory ([`DbBed::domain_xml`]).
#[derive(Clone, Copy, Debug)]
pub struct DomainMemory<'a> {
    /// RAM, MiB.
    pub ram_mib: u64,
    /// The guest's buffer pool (`dbm.pool=`).
    pub pool: &'a str,
    /// NUMA cells: more than one gives each cell an equal share of the RAM
    /// (a memory backend and file each); the cells after the first have
    /// no vCPU.
    pub numa_cells: u32,
}

impl<'a> DomainMemory<'a> {
    /// `ram_mib` of RAM in one piece, a `pool` buffer pool.
    pub fn new(ram_mib: u64, pool: &'a str) -> Self {
        Self {
            ram_mib,
            pool,
            numa_cells: 1,
        }
    }
}

/// A fixed UUID per bed, so that both hosts' XMLs name the same domain.
fn uuid_of(tb: &Testbed) -> String {
    let n: u32 = tb.tag.trim_start_matches("dbm").parse().unwrap_or(0);
    format!("6f3c1d0e-5a2b-4c3d-9e8f-{:012x}", n)
}

impl DbBed {
    /// The XML of VM slot 0 as libvirt domain `name` on `host` (`on_src`:
    /// the source host's disks, taps and paths), with the preload library
    /// matching libvirt's RAM file name, written into the bed's directory.
    pub fn domain_xml(
        &self,
        name: &str,
        host: &LibvirtHost,
        guest: &MariadbGuest,
        on_src: bool,
        mem: DomainMemory<'_>,
    ) -> Result<DomainFiles> {
        let (ram_mib, pool) = (mem.ram_mib, mem.pool);
        let sl = &self.slots[0];
        let label = &host.label;
        let dir = &self.tb.dir;
        let files = DomainFiles {
            xml: dir.join(format!("{name}-{label}.xml")),
            qmp: dir.join(format!("{name}-{label}.qmp")),
            events: dir.join(format!("{name}-{label}.events.qmp")),
            serial: dir.join(format!("{name}-{label}.serial")),
            hints: dir.join(format!("{name}-{label}.hints")),
        };
        let emulator = dir.join("qemu-tcg-single");
        std::fs::write(&emulator, TCG_SINGLE)?;
        crate::sh(&["chmod", "755", &emulator.to_string_lossy()])?;
        let nbd = if on_src {
            &sl.nbd_from_src
        } else {
            &sl.nbd_from_dst
        };
        let (nbd_host, nbd_port) = nbd
            .trim_start_matches("nbd://")
            .split_once(':')
            .context("NBD address")?;
        let lib = crate::bin_dir()?.join("libdbmigrate_preload.so");
        let xml = format!(
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{ram_mib}</memory>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet dbm.ip={ip}/24 dbm.pool={pool}{extra}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='maximum' check='none'>{numa}</cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source protocol='nbd'><host name='{nbd_host}' port='{nbd_port}'/></source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='ethernet'>
      <mac address='{mac}'/>
      <target dev='{tap}' managed='no'/>
      <model type='virtio'/>
    </interface>
    <channel type='unix'>
      <source mode='bind' path='{hints}'/>
      <target type='virtio' name='org.dbmigrate.hints'/>
    </channel>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:{qmp},server=on,wait=off'/>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:{events},server=on,wait=off'/>
    <qemu:env name='LD_PRELOAD' value='{lib}'/>
    <qemu:env name='DBMIGRATE_TRACK_PATH' value='{pattern}'/>
  </qemu:commandline>
</domain>
",
            uuid = uuid_of(&self.tb),
            kernel = guest.kernel.display(),
            initrd = self.initrd.display(),
            ip = sl.vm_ip,
            extra = self.kernel_extra,
            emulator = emulator.display(),
            mac = sl.mac,
            tap = sl.tap,
            hints = files.hints.display(),
            serial = files.serial.display(),
            qmp = files.qmp.display(),
            events = files.events.display(),
            lib = lib.display(),
            pattern = host.ram_pattern(name),
            numa = numa_cells(mem.numa_cells, ram_mib),
        );
        std::fs::write(&files.xml, xml)?;
        Ok(files)
    }

    /// Defines domain `name` from `files` on `host` and starts it, as an
    /// operator's persistent VM; the handle's QEMU belongs to libvirtd.
    pub fn start_domain(&self, host: &LibvirtHost, name: &str, files: &DomainFiles) -> Result<Vm> {
        for stale in [&files.qmp, &files.events, &files.serial, &files.hints] {
            let _ = std::fs::remove_file(stale);
        }
        host.virsh_ok(&["define", &files.xml.to_string_lossy()])?;
        host.virsh_ok(&["start", name])?;
        domain_vm(host, name, files)
    }
}

/// A handle on domain `name` running on `host` (started by libvirt, by
/// the test or by the destination agent).
pub fn domain_vm(host: &LibvirtHost, name: &str, files: &DomainFiles) -> Result<Vm> {
    let pid = host.qemu_pid(name)?;
    let ram = std::fs::read_dir(host.ram_dir.join("libvirt/qemu"))
        .ok()
        .and_then(|d| {
            d.flatten()
                .flat_map(|e| ["pc.ram", "ram-node0"].map(|f| e.path().join(f)))
                .find(|p| p.exists())
        })
        .unwrap_or_default();
    let vm = Vm {
        name: format!("{name}-{}", host.label),
        qmp: files.qmp.clone(),
        events: files.events.clone(),
        serial: files.serial.clone(),
        ram,
        // libvirt removes its own RAM files.
        ram_files: Vec::new(),
        process: VmProcess::Libvirt(pid),
    };
    let t = Instant::now();
    while !vm.qmp.exists() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("domain {name} on {} opened no QMP socket", host.label);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(vm)
}

/// libvirt's QEMU log of domain `name` on `host`.
pub fn qemu_log(host: &LibvirtHost, name: &str) -> String {
    std::fs::read_to_string(host.base.join(format!("log/qemu/{name}.log"))).unwrap_or_default()
}
