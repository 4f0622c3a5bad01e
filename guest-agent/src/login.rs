//! How the agent logs in to the database server, for what needs SQL (the
//! guest-side scan's list of clean pages, `export`); the file layout the
//! host's scan uses needs none ([`crate::discover`]).
//!
//! As MySQL's and MariaDB's own clients: options on the command line win
//! over an option file (`--defaults-file`, its `[client]` and
//! `[dbmigrate-guest-agent]` groups: `user`, `password`, `socket`), which
//! wins over the defaults (root over the server's socket, which Debian's
//! MariaDB authenticates by the process's user).

use std::path::{Path, PathBuf};

use thiserror::Error;

/// The server's socket unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/mysqld/mysqld.sock";
/// Largest option file read.
const MAX_FILE: u64 = 64 << 10;

/// Why the login options cannot be used.
#[derive(Debug, Error)]
pub enum LoginError {
    /// The option file cannot be read.
    #[error("cannot read the option file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The option file is too large to be one.
    #[error("the option file {0} is larger than 64 KiB: is it an option file?")]
    TooLarge(PathBuf),
}

/// User, password and socket of a login.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Login {
    /// Unix socket of the server.
    pub socket: PathBuf,
    /// SQL user.
    pub user: String,
    /// Password, if the user has one.
    pub password: Option<String>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("socket", &self.socket)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// What an option file says (each field only if it says it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// `user`.
    pub user: Option<String>,
    /// `password`.
    pub password: Option<String>,
    /// `socket`.
    pub socket: Option<PathBuf>,
}

/// The `[client]` and `[dbmigrate-guest-agent]` groups of an option file
/// (a later line wins; other groups, comments, `!include` lines are
/// skipped). Pure.
pub fn parse_option_file(text: &str) -> FileOptions {
    let mut out = FileOptions::default();
    let mut ours = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty()
            || line.starts_with('#')
            || line.starts_with(';')
            || line.starts_with('!')
        {
            continue;
        }
        if let Some(group) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            ours = matches!(group.trim(), "client" | "dbmigrate-guest-agent");
            continue;
        }
        if !ours {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = unquote(value.trim());
        match key.trim().replace('_', "-").as_str() {
            "user" => out.user = Some(value),
            "password" => out.password = Some(value),
            "socket" => out.socket = Some(PathBuf::from(value)),
            _ => {}
        }
    }
    out
}

/// A value without its surrounding quotes.
fn unquote(v: &str) -> String {
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return v[1..v.len() - 1].to_string();
        }
    }
    v.to_string()
}

impl Login {
    /// The login from the command line (`socket`, `user`), the option file
    /// and the defaults, in that order.
    pub fn new(
        socket: Option<PathBuf>,
        user: Option<String>,
        defaults_file: Option<&Path>,
    ) -> Result<Self, LoginError> {
        let file = match defaults_file {
            None => FileOptions::default(),
            Some(path) => {
                let read = |source| LoginError::Read {
                    path: path.to_path_buf(),
                    source,
                };
                if std::fs::metadata(path).map_err(read)?.len() > MAX_FILE {
                    return Err(LoginError::TooLarge(path.to_path_buf()));
                }
                parse_option_file(&std::fs::read_to_string(path).map_err(read)?)
            }
        };
        Ok(Self {
            socket: socket
                .or(file.socket)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            user: user.or(file.user).unwrap_or_else(|| "root".into()),
            password: file.password,
        })
    }

    /// The connection options.
    pub fn opts(&self) -> mysql_async::OptsBuilder {
        mysql_async::OptsBuilder::default()
            .socket(Some(self.socket.to_string_lossy().into_owned()))
            .user(Some(self.user.clone()))
            .pass(self.password.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_groups_of_an_option_file() {
        let text = "\
# dbmigrate's login
[mysqld]
socket = /wrong.sock
[client]
user = dbmigrate
password = \"p#ss word\"
!includedir /etc/mysql/conf.d/
[mysql]
user = other
[dbmigrate-guest-agent]
socket='/run/mysqld/mysqld.sock'
";
        assert_eq!(
            parse_option_file(text),
            FileOptions {
                user: Some("dbmigrate".into()),
                password: Some("p#ss word".into()),
                socket: Some(PathBuf::from("/run/mysqld/mysqld.sock")),
            }
        );
        assert_eq!(
            parse_option_file("garbage\n[client\nuser"),
            FileOptions::default()
        );
    }

    #[test]
    fn the_command_line_wins_over_the_file_over_the_defaults() {
        let dir = std::env::temp_dir().join(format!("dbm-login-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("my.cnf");
        std::fs::write(&f, "[client]\nuser=u\npassword=pw\nsocket=/s.sock\n").unwrap();
        let l = Login::new(None, None, Some(&f)).unwrap();
        assert_eq!(
            (l.socket.as_path(), l.user.as_str(), l.password.as_deref()),
            (Path::new("/s.sock"), "u", Some("pw"))
        );
        let l = Login::new(Some("/x.sock".into()), Some("v".into()), Some(&f)).unwrap();
        assert_eq!(
            (l.socket.as_path(), l.user.as_str()),
            (Path::new("/x.sock"), "v")
        );
        let l = Login::new(None, None, None).unwrap();
        assert_eq!(
            (l.socket.as_path(), l.user.as_str(), l.password),
            (Path::new(DEFAULT_SOCKET), "root", None)
        );
        assert!(!format!("{:?}", Login::new(None, None, Some(&f)).unwrap()).contains("pw"));
        assert!(matches!(
            Login::new(None, None, Some(&dir.join("none"))),
            Err(LoginError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
