//! A small QMP client: JSON lines over QEMU's monitor socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// QMP failures.
#[derive(Debug, Error)]
pub enum QmpError {
    /// The socket could not be opened.
    #[error("cannot connect to the QMP socket {path}: start QEMU with `-qmp unix:{path},server=on,wait=off` and check the path")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("QMP connection to {path} failed while {doing}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// What was done.
        doing: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// QEMU closed the monitor (it exited).
    #[error("QEMU closed its QMP socket {path} while {doing} (did QEMU exit?)")]
    Closed {
        /// Socket path.
        path: PathBuf,
        /// What was done.
        doing: String,
    },
    /// QEMU accepted the connection but never greeted: it serves one QMP
    /// client at a time and another one holds the socket.
    #[error("QEMU at {path} did not greet within {secs} s: another client is probably connected to that QMP socket (QEMU serves one at a time); disconnect it or give QEMU a second `-qmp` socket for dbmigrate")]
    Busy {
        /// Socket path.
        path: PathBuf,
        /// Seconds waited.
        secs: u64,
    },
    /// Not QMP.
    #[error("{path} did not speak QMP: {detail}")]
    NotQmp {
        /// Socket path.
        path: PathBuf,
        /// What came.
        detail: String,
    },
    /// QEMU answered with an error.
    #[error("QEMU refused `{command}`: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's text.
        desc: String,
    },
    /// No answer in time.
    #[error("QEMU did not answer `{command}` within {secs} s")]
    Timeout {
        /// The command.
        command: String,
        /// Seconds waited.
        secs: u64,
    },
}

/// A connected QMP session (capabilities negotiated).
pub struct Qmp {
    path: PathBuf,
    rx: BufReader<OwnedReadHalf>,
    tx: OwnedWriteHalf,
    pid: Option<u32>,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.into(),
                source,
            })?;
        // QEMU's pid from the socket's peer credentials: the dirty tracker
        // needs it and QMP has no command that tells it.
        let pid = s
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok());
        let (r, w) = s.into_split();
        let mut q = Self {
            path: path.into(),
            rx: BufReader::new(r),
            tx: w,
            pid,
        };
        const GREETING_WAIT: Duration = Duration::from_secs(10);
        let greeting = tokio::time::timeout(GREETING_WAIT, q.read_json("reading the QMP greeting"))
            .await
            .map_err(|_| QmpError::Busy {
                path: path.into(),
                secs: GREETING_WAIT.as_secs(),
            })??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::NotQmp {
                path: path.into(),
                detail: greeting.to_string(),
            });
        }
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    /// Closes this connection and opens a fresh one. QEMU serves one QMP
    /// client at a time and, when a client goes away, drops the commands it
    /// had queued; the greeting on the new connection comes only after
    /// that: nothing sent on the old one (a `cont` that timed out) can run
    /// after this returns.
    pub async fn reconnect(&mut self) -> Result<(), QmpError> {
        let _ = self.tx.shutdown().await;
        // QEMU answers the shutdown by closing its end: read to EOF.
        let drained = async {
            let mut line = String::new();
            while matches!(self.rx.read_line(&mut line).await, Ok(n) if n > 0) {
                line.clear();
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drained).await;
        *self = Qmp::connect(&self.path.clone()).await?;
        Ok(())
    }

    /// QEMU's process id, if the kernel told it.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn read_json(&mut self, doing: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .rx
                .read_line(&mut line)
                .await
                .map_err(|source| QmpError::Io {
                    path: self.path.clone(),
                    doing: doing.into(),
                    source,
                })?;
            if n == 0 {
                return Err(QmpError::Closed {
                    path: self.path.clone(),
                    doing: doing.into(),
                });
            }
            let v: Value = serde_json::from_str(line.trim()).map_err(|e| QmpError::NotQmp {
                path: self.path.clone(),
                detail: format!("{e}: {}", line.trim()),
            })?;
            if v.get("event").is_some() {
                tracing::debug!(event = %v, "QMP event");
                continue;
            }
            return Ok(v);
        }
    }

    /// Runs a command and returns its `return` value (default 30 s limit).
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.execute_within(command, args, Duration::from_secs(30))
            .await
    }

    /// Runs a command with a time limit.
    pub async fn execute_within(
        &mut self,
        command: &str,
        args: Option<Value>,
        limit: Duration,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let doing = format!("running `{command}`");
        let fut = async {
            self.tx
                .write_all(line.as_bytes())
                .await
                .map_err(|source| QmpError::Io {
                    path: self.path.clone(),
                    doing: doing.clone(),
                    source,
                })?;
            self.read_json(&doing).await
        };
        let v = tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| QmpError::Timeout {
                command: command.into(),
                secs: limit.as_secs(),
            })??;
        if let Some(e) = v.get("error") {
            return Err(QmpError::Command {
                command: command.into(),
                class: e["class"].as_str().unwrap_or("?").into(),
                desc: e["desc"].as_str().unwrap_or("?").into(),
            });
        }
        Ok(v.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Current run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        Ok(v["status"].as_str().unwrap_or("unknown").to_string())
    }
}
