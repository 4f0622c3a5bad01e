//! Fault injection for the fault suite (`tests/tests/fault_e2e.rs`): with
//! `DBMIGRATE_FAILPOINT=<name>:<action>` the agent, on reaching the stage
//! `<name>`, dies at once (`abort`, as `kill -9` would leave it), or stops
//! there until the file `<path>` is removed (`pause:<path>`: the test cuts
//! a link meanwhile, so the fault hits exactly at that stage). A failpoint
//! fires the first time its stage is reached, not again. Unset, it costs
//! one environment lookup per stage.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static FIRED: AtomicBool = AtomicBool::new(false);

/// The stage `name` is reached.
pub fn hit(name: &str) {
    let Ok(spec) = std::env::var("DBMIGRATE_FAILPOINT") else {
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
