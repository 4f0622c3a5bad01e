//! The libvirt operations around a move, through `virsh` (libvirt's own
//! client, on every libvirt host), each bounded by a deadline so that a
//! hung libvirtd cannot hold a migration.
//!
//! Arguments are passed to virsh as separate words (no shell); a domain
//! name is a checked [`DomainName`], so nothing becomes an option or a
//! command that it was not meant to be.

use std::ffi::OsStr;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::domain::DomainName;

/// Most output read from one virsh call (a domain XML is a few KiB).
const MAX_OUTPUT: u64 = 4 << 20;
/// Longest connection URI accepted.
const MAX_URI: usize = 1024;

/// virsh failures.
#[derive(Debug, Error)]
pub enum VirshError {
    /// The URI is unusable.
    #[error("libvirt URI `{0}` is unusable: give one such as qemu:///system")]
    Uri(String),
    /// virsh could not be started.
    #[error("cannot run virsh (install libvirt-clients): {0}")]
    Spawn(#[source] std::io::Error),
    /// virsh did not finish in time.
    #[error(
        "`virsh {what}` on {uri} did not finish in {secs} s: is libvirtd running and answering?"
    )]
    Timeout {
        /// The operation.
        what: String,
        /// Connection.
        uri: String,
        /// Deadline.
        secs: u64,
    },
    /// virsh reported an error.
    #[error("`virsh {what}` on {uri} failed: {stderr}")]
    Failed {
        /// The operation.
        what: String,
        /// Connection.
        uri: String,
        /// virsh's message.
        stderr: String,
    },
    /// The domain does not exist.
    #[error("libvirt at {uri} has no domain {name}")]
    NoDomain {
        /// Connection.
        uri: String,
        /// Domain.
        name: String,
    },
    /// The domain did not reach a state in time.
    #[error("domain {name} on {uri} is still {state} after {secs} s, expected {want}")]
    StateTimeout {
        /// Domain.
        name: String,
        /// Connection.
        uri: String,
        /// Its state.
        state: String,
        /// Wanted state.
        want: &'static str,
        /// How long it was given.
        secs: u64,
    },
}

/// A domain's state as `virsh domstate` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainState {
    /// `running`.
    Running,
    /// `paused`.
    Paused,
    /// `shut off`.
    ShutOff,
    /// Anything else (`in shutdown`, `crashed`, `pmsuspended`, ...).
    Other(String),
}

impl DomainState {
    /// From `virsh domstate`'s first line (pure).
    pub fn parse(s: &str) -> Self {
        match s.lines().next().unwrap_or("").trim() {
            "running" => Self::Running,
            "paused" => Self::Paused,
            "shut off" => Self::ShutOff,
            other => Self::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for DomainState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Running => f.write_str("running"),
            Self::Paused => f.write_str("paused"),
            Self::ShutOff => f.write_str("shut off"),
            Self::Other(s) => f.write_str(s),
        }
    }
}

/// A connection to one libvirtd, through virsh.
#[derive(Clone, Debug)]
pub struct Virsh {
    uri: String,
    deadline: Duration,
}

impl Virsh {
    /// Checks `uri` (e.g. `qemu:///system`); each call gets `deadline`.
    pub fn new(uri: &str, deadline: Duration) -> Result<Self, VirshError> {
        if uri.is_empty()
            || uri.len() > MAX_URI
            || uri.starts_with('-')
            || !uri.contains(':')
            || uri.chars().any(char::is_control)
        {
            return Err(VirshError::Uri(uri.escape_debug().to_string()));
        }
        Ok(Self {
            uri: uri.to_string(),
            deadline,
        })
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Runs `virsh -c URI args...`; its stdout on success.
    fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String, VirshError> {
        let what = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("virsh")
            // Its own process group: a deadline stops an ssh it started too.
            .process_group(0)
            .arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(VirshError::Spawn)?;
        // Both pipes drained on their own threads: a full pipe never blocks virsh.
        let drain = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut out = Vec::new();
                if let Some(r) = r {
                    let _ = r.take(MAX_OUTPUT).read_to_end(&mut out);
                }
                String::from_utf8_lossy(&out).into_owned()
            })
        };
        let out = drain(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let err = drain(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let start = Instant::now();
        let status = loop {
            match child.try_wait().map_err(VirshError::Spawn)? {
                Some(s) => break s,
                None if start.elapsed() > self.deadline => {
                    if let Ok(pgid) = i32::try_from(child.id()) {
                        // SAFETY: kill(2) of the process group made for this
                        // child alone; no memory is involved.
                        unsafe { libc::kill(-pgid, libc::SIGKILL) };
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(VirshError::Timeout {
                        what,
                        uri: self.uri.clone(),
                        secs: self.deadline.as_secs(),
                    });
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        if !status.success() {
            return Err(VirshError::Failed {
                what,
                uri: self.uri.clone(),
                stderr: stderr.trim().to_string(),
            });
        }
        Ok(stdout)
    }

    /// Whether libvirt knows the domain (running, or defined and shut off).
    pub fn exists(&self, name: &DomainName) -> Result<bool, VirshError> {
        let list = self.run(&["list", "--all", "--name"])?;
        Ok(list.lines().any(|l| l.trim() == name.as_str()))
    }

    /// The domain's state, or None if libvirt does not know it.
    pub fn state(&self, name: &DomainName) -> Result<Option<DomainState>, VirshError> {
        if !self.exists(name)? {
            return Ok(None);
        }
        match self.run(&["domstate", "--", name.as_str()]) {
            Ok(s) => Ok(Some(DomainState::parse(&s))),
            // Gone between the two calls (a transient domain whose QEMU quit).
            Err(_) if !self.exists(name)? => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether the domain has a persistent definition.
    pub fn is_persistent(&self, name: &DomainName) -> Result<bool, VirshError> {
        let info = self.run(&["dominfo", "--", name.as_str()])?;
        Ok(info.lines().any(|l| {
            let mut f = l.split(':');
            f.next().map(str::trim) == Some("Persistent") && f.next().map(str::trim) == Some("yes")
        }))
    }

    /// The domain's XML: the running one, or with `inactive` the persistent
    /// definition.
    pub fn dumpxml(&self, name: &DomainName, inactive: bool) -> Result<String, VirshError> {
        if !self.exists(name)? {
            return Err(VirshError::NoDomain {
                uri: self.uri.clone(),
                name: name.to_string(),
            });
        }
        let mut args = vec!["dumpxml"];
        if inactive {
            args.push("--inactive");
        }
        args.extend(["--", name.as_str()]);
        self.run(&args)
    }

    /// Starts a transient domain from `xml`, paused (QEMU never runs the
    /// guest until told to).
    pub fn create_paused(&self, xml: &Path) -> Result<(), VirshError> {
        self.run(&[
            OsStr::new("create"),
            OsStr::new("--paused"),
            OsStr::new("--file"),
            xml.as_os_str(),
        ])
        .map(drop)
    }

    /// Defines (or redefines) the persistent configuration from `xml`; a
    /// running transient domain of that name and UUID becomes persistent.
    pub fn define(&self, xml: &Path) -> Result<(), VirshError> {
        self.run(&[OsStr::new("define"), OsStr::new("--file"), xml.as_os_str()])
            .map(drop)
    }

    /// Removes the persistent definition (the domain must be shut off, or
    /// it becomes transient). Keeps an NVRAM file, which is the guest's
    /// firmware state and now the destination's to keep.
    pub fn undefine(&self, name: &DomainName) -> Result<(), VirshError> {
        self.run(&["undefine", "--keep-nvram", "--", name.as_str()])
            .map(drop)
    }

    /// Stops the domain's QEMU at once.
    pub fn destroy(&self, name: &DomainName) -> Result<(), VirshError> {
        self.run(&["destroy", "--", name.as_str()]).map(drop)
    }

    /// Waits until the domain is shut off or gone (None), for at most `limit`.
    pub fn wait_stopped(
        &self,
        name: &DomainName,
        limit: Duration,
    ) -> Result<Option<DomainState>, VirshError> {
        let start = Instant::now();
        loop {
            let s = self.state(name)?;
            match s {
                None | Some(DomainState::ShutOff) => return Ok(s),
                Some(other) if start.elapsed() > limit => {
                    return Err(VirshError::StateTimeout {
                        name: name.to_string(),
                        uri: self.uri.clone(),
                        state: other.to_string(),
                        want: "shut off",
                        secs: limit.as_secs(),
                    })
                }
                Some(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states() {
        assert_eq!(DomainState::parse("running\n\n"), DomainState::Running);
        assert_eq!(DomainState::parse("shut off\n"), DomainState::ShutOff);
        assert_eq!(DomainState::parse("paused"), DomainState::Paused);
        assert_eq!(
            DomainState::parse("in shutdown"),
            DomainState::Other("in shutdown".into())
        );
    }

    #[test]
    fn uris_that_are_not_uris_are_refused() {
        let d = Duration::from_secs(1);
        assert!(Virsh::new("qemu:///system", d).is_ok());
        assert!(Virsh::new("qemu+unix:///system?socket=/run/x/libvirt-sock", d).is_ok());
        for bad in ["", "--help", "system", "qemu:///sys\ntem"] {
            assert!(
                matches!(Virsh::new(bad, d), Err(VirshError::Uri(_))),
                "{bad:?}"
            );
        }
    }
}
