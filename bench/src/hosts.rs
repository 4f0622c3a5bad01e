//! `compare-db --hosts isolated`: separate hosts emulated on one machine
//! by CPU affinity. The source host (its QEMU, with QEMU's own migration
//! threads, and the source agent) gets CPU 0; the destination host (its
//! QEMU and agent), the storage server (qemu-nbd) and the client (sysbench
//! or the TPC-C driver, and the bench itself, which drives the QMP side of
//! QEMU's migrations) get CPU 1. Affinity is inherited by every thread and
//! child started later, so a process is pinned once, when it starts
//! ([`Hosts::wrap`]) or right after ([`Hosts::pin_ns`]). `shared` (the
//! default) leaves the scheduler free, as before.

use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// How the emulated hosts share the machine's CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Hosts {
    /// Every process may run on every CPU.
    Shared,
    /// The source host on CPU 0; destination, storage and client on CPU 1.
    Isolated,
}

/// One of the emulated hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    Source,
    Destination,
    Storage,
    Client,
}

impl Hosts {
    /// The report's name of the layout.
    pub fn name(self) -> &'static str {
        match self {
            Hosts::Shared => "shared",
            Hosts::Isolated => "isolated",
        }
    }

    /// The CPU list `host` runs on, None for any (pure).
    pub fn cpus(self, host: Host) -> Option<&'static str> {
        match (self, host) {
            (Hosts::Shared, _) => None,
            (Hosts::Isolated, Host::Source) => Some("0"),
            (Hosts::Isolated, _) => Some("1"),
        }
    }

    /// The layout as the report records it (pure).
    pub fn layout(self) -> Value {
        let cpus = |h| {
            self.cpus(h)
                .map_or_else(|| "any".to_string(), str::to_string)
        };
        json!({
            "source": cpus(Host::Source),
            "destination": cpus(Host::Destination),
            "storage": cpus(Host::Storage),
            "client": cpus(Host::Client),
        })
    }

    /// Checks the machine has the CPUs, and pins the bench itself (it
    /// drives QEMU's migrations and reads the load's logs) with the client.
    pub fn setup(self) -> Result<()> {
        if self == Hosts::Shared {
            return Ok(());
        }
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        if n < 2 {
            bail!("--hosts isolated needs 2 CPUs, this machine has {n}");
        }
        self.pin_pid(Host::Client, std::process::id())
    }

    /// `cmd` started with `host`'s CPUs (through taskset(1)); as it is for shared hosts.
    pub fn wrap(self, host: Host, cmd: Command) -> Command {
        let Some(cpus) = self.cpus(host) else {
            return cmd;
        };
        let mut c = Command::new("taskset");
        c.args(["-c", cpus])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        c
    }

    /// Moves every thread of `pid` to `host`'s CPUs.
    pub fn pin_pid(self, host: Host, pid: u32) -> Result<()> {
        let Some(cpus) = self.cpus(host) else {
            return Ok(());
        };
        let out = Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid.to_string()])
            .output()
            .context("running taskset (util-linux)")?;
        // A process that ended meanwhile needs no CPU.
        if !out.status.success() && std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!(
                "taskset -p {cpus} {pid}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Moves every process in network namespace `ns` to `host`'s CPUs.
    pub fn pin_ns(self, host: Host, ns: &str) -> Result<()> {
        if self.cpus(host).is_none() {
            return Ok(());
        }
        let out = Command::new("ip").args(["netns", "pids", ns]).output()?;
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse() {
                self.pin_pid(host, pid)?;
            }
        }
        Ok(())
    }

    /// Pins every process of a database bed's four hosts.
    pub fn pin_bed(self, bed: &dbmigrate_testbed::DbBed) -> Result<()> {
        self.pin_ns(Host::Source, &bed.tb.src_ns)?;
        self.pin_ns(Host::Destination, &bed.tb.dst_ns)?;
        self.pin_ns(Host::Storage, &bed.stor_ns)?;
        self.pin_ns(Host::Client, &bed.cli_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolated_hosts_split_the_two_cpus() {
        assert_eq!(Hosts::Isolated.cpus(Host::Source), Some("0"));
        for h in [Host::Destination, Host::Storage, Host::Client] {
            assert_eq!(Hosts::Isolated.cpus(h), Some("1"));
            assert_eq!(Hosts::Shared.cpus(h), None);
        }
        assert_eq!(Hosts::Isolated.layout()["source"], "0");
        assert_eq!(Hosts::Shared.layout()["client"], "any");
    }

    #[test]
    fn a_wrapped_command_keeps_its_arguments_and_environment() {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", "x", "sysbench"]).env("A", "1");
        let w = Hosts::Isolated.wrap(Host::Client, c);
        assert_eq!(w.get_program(), "taskset");
        let args: Vec<_> = w.get_args().collect();
        assert_eq!(args, ["-c", "1", "ip", "netns", "exec", "x", "sysbench"]);
        assert!(w
            .get_envs()
            .any(|(k, v)| k == "A" && v == Some("1".as_ref())));
        let same = Hosts::Shared.wrap(Host::Client, Command::new("ip"));
        assert_eq!(same.get_program(), "ip");
    }
}
