//! Fault injection for the fault suite (`tests/tests/fault_e2e.rs`): with
//! `DBMIGRATE_FAILPOINT=<name>:<action>` the agent, on reaching the stage
//! `<name>`, dies at once (`abort`, as `kill -9` would leave it), or stops
//! there until the file `<path>` is removed (`pause:<path>`: the test cuts
//! a link meanwhile, so the fault hits exactly at that stage). A failpoint
//! fires the first time its stage is reached, not again.
//!
//! Only in test builds: the code exists with the cargo feature `failpoints`,
//! which cannot be combined with a build without debug assertions (as
//! `cargo build --release` and packages are); `scripts/test.sh` builds such
//! an agent into its own target directory. Elsewhere [`hit`] is empty.

#[cfg(all(feature = "failpoints", not(debug_assertions)))]
compile_error!("the `failpoints` feature is for test builds only: build it with CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true into a --target-dir of its own, as scripts/test.sh does");

/// The stage `name` is reached (nothing happens: not a test build).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// Shared storage as it is (not a test build).
#[cfg(not(feature = "failpoints"))]
pub fn around_storage(
    s: std::sync::Arc<dyn dbmigrate_core::storage::Storage>,
) -> std::sync::Arc<dyn dbmigrate_core::storage::Storage> {
    s
}

#[cfg(feature = "failpoints")]
pub use injected::{around_storage, hit};

#[cfg(feature = "failpoints")]
mod injected {
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;
    use std::time::Duration;

    use dbmigrate_core::addr::DiskOffset;
    use dbmigrate_core::storage::{Storage, StorageError};

    static FIRED: AtomicBool = AtomicBool::new(false);

    /// Shared storage whose batched reads pass the stage `dst-storage-read`.
    struct AtStorageRead(std::sync::Arc<dyn Storage>);

    impl Storage for AtStorageRead {
        fn disk_sizes(&self) -> &[u64] {
            self.0.disk_sizes()
        }

        fn read_at(
            &self,
            disk: u16,
            offset: DiskOffset,
            buf: &mut [u8],
        ) -> Result<(), StorageError> {
            self.0.read_at(disk, offset, buf)
        }

        fn read_many(
            &self,
            disk: u16,
            reads: &mut [(DiskOffset, &mut [u8])],
        ) -> Result<(), StorageError> {
            hit("dst-storage-read");
            self.0.read_many(disk, reads)
        }
    }

    /// `s` with the storage failpoint in front of its reads.
    pub fn around_storage(s: std::sync::Arc<dyn Storage>) -> std::sync::Arc<dyn Storage> {
        std::sync::Arc::new(AtStorageRead(s))
    }
    static SPEC: OnceLock<Option<String>> = OnceLock::new();

    /// The stage `name` is reached.
    pub fn hit(name: &str) {
        let Some(spec) = SPEC
            .get_or_init(|| std::env::var("DBMIGRATE_FAILPOINT").ok())
            .as_deref()
        else {
            return;
        };
        let mut parts = spec.splitn(3, ':');
        if parts.next() != Some(name) || FIRED.swap(true, Ordering::SeqCst) {
            return;
        }
        match (parts.next(), parts.next()) {
            (Some("abort"), _) => {
                tracing::error!(failpoint = name, "fault injected: the agent dies here");
                std::process::abort();
            }
            (Some("pause"), Some(path)) => {
                tracing::warn!(
                    failpoint = name,
                    path,
                    "fault injected: paused until the file is removed"
                );
                let path = Path::new(path);
                if std::fs::write(path, name).is_err() {
                    return;
                }
                while path.exists() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            _ => tracing::warn!(
                spec,
                "DBMIGRATE_FAILPOINT not understood (use NAME:abort or NAME:pause:PATH)"
            ),
        }
    }
}
