//! A libvirt domain as the VM of a migration: the source domain's QMP
//! socket and guest channel from its XML, the destination domain started
//! paused for the incoming VM, and libvirt's view put right afterwards
//! (running and persistent on the destination; shut off and undefined on
//! the source; after a failure, nothing left on the destination).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dbmigrate_libvirt::{domain, Domain, DomainName, DomainState, Virsh};
use serde::Serialize;

/// Deadline of one libvirt call.
const CALL: Duration = Duration::from_secs(30);
/// How long a QEMU that quit may take to show as shut off.
const STOPPED: Duration = Duration::from_secs(30);

/// `migrate --libvirt URI --domain NAME`.
#[derive(clap::Args, Clone, Debug)]
pub struct SourceArgs {
    /// libvirt connection of the source domain (e.g. `qemu:///system`):
    /// the QMP socket and guest channel come from its XML (see the README's
    /// "With libvirt"), and after the move the domain is
    /// undefined here.
    #[arg(long, requires = "domain", conflicts_with = "qmp")]
    pub libvirt: Option<String>,
    /// The libvirt domain to migrate (with --libvirt).
    #[arg(long, requires = "libvirt")]
    pub domain: Option<String>,
}

/// `receive --libvirt URI --domain-xml FILE`.
#[derive(clap::Args, Clone, Debug)]
pub struct DestArgs {
    /// libvirt connection of the destination: the domain is started there
    /// paused for the incoming VM, and defined (persistent) once it runs.
    #[arg(long, requires = "domain_xml", conflicts_with = "qmp")]
    pub libvirt: Option<String>,
    /// The domain's XML for the destination, as the source's libvirt shows
    /// it (`virsh dumpxml --migratable NAME`, edited for this host's paths
    /// if they differ), with --libvirt.
    #[arg(long, requires = "libvirt")]
    pub domain_xml: Option<PathBuf>,
}

/// What was done to libvirt's view, in the source's report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LibvirtReport {
    /// Connection.
    pub uri: String,
    /// Domain.
    pub domain: String,
    /// The source domain's state after the attempt (`gone` once undefined
    /// or, transient, once its QEMU quit).
    pub source_state: String,
    /// Whether dbmigrate undefined the source domain.
    pub undefined: bool,
    /// What went wrong putting libvirt's view right, if anything.
    pub error: Option<String>,
}

/// The source domain of a migration.
pub struct SourceDomain {
    virsh: Virsh,
    /// What its XML says.
    pub dom: Domain,
}

impl SourceDomain {
    /// Finds the running domain `name` and reads its XML.
    pub fn open(uri: &str, name: &str) -> Result<Self> {
        let virsh = Virsh::new(uri, CALL)?;
        let name = DomainName::new(name).context("--domain")?;
        match virsh.state(&name)? {
            Some(DomainState::Running | DomainState::Paused) => {}
            Some(s) => bail!("domain {name} on {uri} is {s}: only a running VM can be migrated"),
            None => bail!("libvirt at {uri} has no domain {name} (`virsh -c {uri} list --all`)"),
        }
        let xml = virsh.dumpxml(&name, false)?;
        let dom = domain::parse(&xml).with_context(|| format!("domain {name} on {uri}"))?;
        if dom.name != name {
            bail!("libvirt returned the XML of {} for domain {name}", dom.name);
        }
        Ok(Self { virsh, dom })
    }

    /// After the destination took the VM and the source QEMU quit: waits
    /// for libvirt to see it shut off and undefines it, so that only the
    /// destination holds the domain.
    pub fn finish(&self) -> LibvirtReport {
        let mut r = LibvirtReport {
            uri: self.virsh.uri().to_string(),
            domain: self.dom.name.to_string(),
            ..LibvirtReport::default()
        };
        let step = || -> Result<(String, bool)> {
            let name = &self.dom.name;
            let stopped = match self.virsh.wait_stopped(name, STOPPED) {
                Ok(s) => s,
                // The VM runs on the destination: a source QEMU that did
                // not quit must not stay (nor start again with the host).
                Err(e) => {
                    tracing::warn!(domain = %name, error = %e, "the source QEMU did not stop; destroying it");
                    self.virsh.destroy(name)?;
                    self.virsh.wait_stopped(name, STOPPED)?
                }
            };
            match stopped {
                None => Ok(("gone".into(), false)),
                Some(_) if self.virsh.is_persistent(name)? => {
                    self.virsh.undefine(name)?;
                    let left = self.virsh.state(name)?;
                    Ok((left.map_or("gone".into(), |s| s.to_string()), true))
                }
                Some(s) => Ok((s.to_string(), false)),
            }
        };
        match step() {
            Ok((state, undefined)) => {
                tracing::info!(domain = %self.dom.name, state, undefined, "source domain put right");
                r.source_state = state;
                r.undefined = undefined;
            }
            Err(e) => {
                r.error = Some(format!(
                    "{e:#}; the VM runs on the destination: undefine the source domain by hand (`virsh -c {} undefine --keep-nvram {}`)",
                    self.virsh.uri(),
                    self.dom.name
                ));
                r.source_state = "unknown".into();
            }
        }
        r
    }
}

/// The destination domain of a migration, started paused and waiting.
pub struct DestDomain {
    virsh: Virsh,
    /// What its XML says.
    pub dom: Domain,
    /// The operator's XML, defined once the VM runs here.
    xml: PathBuf,
    /// Whether libvirt had a definition of the domain before (left as it was).
    was_defined: bool,
}

impl DestDomain {
    /// Starts the domain of `xml` paused, waiting for an incoming VM
    /// (`-incoming defer`, and `DBMIGRATE_POSTCOPY_SOCKET` when the agent
    /// takes post-copy), writing its XML into `dir` (the agent's private
    /// directory), and waits for its QMP socket.
    pub fn start(uri: &str, xml: &Path, dir: &Path, postcopy: Option<&Path>) -> Result<Self> {
        let virsh = Virsh::new(uri, CALL)?;
        let len = std::fs::metadata(xml)
            .with_context(|| format!("reading --domain-xml {}", xml.display()))?
            .len();
        if len > domain::MAX_XML_BYTES as u64 {
            bail!(
                "--domain-xml {} is {len} bytes: not a domain XML",
                xml.display()
            );
        }
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(
                std::fs::File::open(xml)
                    .with_context(|| format!("reading --domain-xml {}", xml.display()))?,
                domain::MAX_XML_BYTES as u64 + 1,
            ),
            &mut text,
        )
        .with_context(|| format!("reading --domain-xml {}", xml.display()))?;
        let dom =
            domain::parse(&text).with_context(|| format!("--domain-xml {}", xml.display()))?;
        let name = &dom.name;
        let was_defined = match virsh.state(name)? {
            None => false,
            Some(DomainState::ShutOff) => true,
            Some(s) => bail!(
                "domain {name} is {s} on {uri} already: a VM of that name runs here (stop it, or give this VM another name)"
            ),
        };
        let postcopy_env = postcopy.map(|p| p.to_string_lossy().into_owned());
        let env: Vec<(&str, &str)> = postcopy_env
            .as_deref()
            .map(|p| vec![("DBMIGRATE_POSTCOPY_SOCKET", p)])
            .unwrap_or_default();
        let incoming = domain::incoming_xml(&text, &env)
            .with_context(|| format!("--domain-xml {}", xml.display()))?;
        let path = dir.join(format!("{name}.incoming.xml"));
        std::fs::write(&path, incoming).with_context(|| format!("writing {}", path.display()))?;
        // A socket left by an earlier QEMU would look like this one's.
        let _ = std::fs::remove_file(&dom.qmp);
        let created = virsh.create_paused(&path);
        let d = Self {
            virsh,
            xml: xml.to_path_buf(),
            was_defined,
            dom,
        };
        if let Err(e) = created {
            // A virsh given up on may still have had libvirtd start it.
            d.abandon();
            return Err(anyhow::Error::new(e).context(format!(
                "starting domain {} paused for the incoming VM",
                d.dom.name
            )));
        }
        d.wait_qmp()?;
        tracing::info!(domain = %d.dom.name, qmp = %d.dom.qmp.display(), "destination domain waits for the VM");
        Ok(d)
    }

    fn wait_qmp(&self) -> Result<()> {
        let start = Instant::now();
        while !self.dom.qmp.exists() {
            if start.elapsed() > CALL {
                self.abandon();
                bail!(
                    "domain {} started but its QMP socket {} did not appear in {} s",
                    self.dom.name,
                    self.dom.qmp.display(),
                    CALL.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The VM runs here: the domain becomes persistent with the operator's XML.
    pub fn commit(&self) -> Result<()> {
        self.virsh.define(&self.xml).with_context(|| {
            format!(
                "the VM runs on this host but libvirt could not make domain {} persistent: run `virsh -c {} define {}`",
                self.dom.name,
                self.virsh.uri(),
                self.xml.display()
            )
        })
    }

    /// The receive failed. A domain that runs here (the VM was resumed
    /// before the failure, as after a post-copy hand-over) is the VM: it is
    /// kept and made persistent. Any other is stopped, and libvirt forgets
    /// a transient one (a definition that was here before stays).
    pub fn after_failure(&self) {
        match self.virsh.state(&self.dom.name) {
            Ok(Some(DomainState::Running)) => {
                tracing::error!(domain = %self.dom.name, "the receive failed after the VM was resumed here: keeping it, and defining it");
                if let Err(e) = self.commit() {
                    tracing::error!("{e:#}");
                }
            }
            _ => self.abandon(),
        }
    }

    /// Stops the waiting domain, which never ran the VM.
    fn abandon(&self) {
        let name = &self.dom.name;
        match self.virsh.state(name) {
            Ok(None | Some(DomainState::ShutOff)) => {}
            Ok(Some(_)) => {
                if let Err(e) = self.virsh.destroy(name) {
                    tracing::error!(domain = %name, error = %e, "could not stop the waiting domain");
                }
            }
            Err(e) => {
                tracing::error!(domain = %name, error = %e, "could not read the waiting domain's state")
            }
        }
        if !self.was_defined {
            match self.virsh.wait_stopped(name, STOPPED) {
                Ok(None) => {}
                Ok(Some(_)) => {
                    tracing::error!(domain = %name, "domain still defined after the failed move")
                }
                Err(e) => {
                    tracing::error!(domain = %name, error = %e, "waiting domain did not stop")
                }
            }
        }
    }
}

/// The source VM: `--qmp` as given, or the domain's QMP socket (and its
/// guest channel, unless `--guest-hints` names another) with --libvirt.
pub fn source_vm(
    qmp: Option<PathBuf>,
    args: &SourceArgs,
    hints: Option<PathBuf>,
) -> Result<(PathBuf, Option<PathBuf>, Option<SourceDomain>)> {
    match (qmp, &args.libvirt, &args.domain) {
        (_, Some(uri), Some(name)) => {
            let d = SourceDomain::open(uri, name)?;
            let hints = hints.or_else(|| d.dom.hints.clone());
            Ok((d.dom.qmp.clone(), hints, Some(d)))
        }
        (Some(q), None, None) => Ok((q, hints, None)),
        _ => bail!("give --qmp, or --libvirt and --domain"),
    }
}

/// With --libvirt: the destination domain, started and waiting.
pub fn dest_vm(
    args: &DestArgs,
    run_dir: &Path,
    postcopy: Option<&Path>,
) -> Result<Option<DestDomain>> {
    let (Some(uri), Some(xml)) = (&args.libvirt, &args.domain_xml) else {
        return Ok(None);
    };
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("creating the run directory {}", run_dir.display()))?;
    DestDomain::start(uri, xml, run_dir, postcopy).map(Some)
}
