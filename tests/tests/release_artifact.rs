//! Test-only hooks never ship: the release `dbmigrate` has no fault
//! injection, while the fault tests' build (which proves the check can see
//! it) does.

use anyhow::Result;
use dbmigrate_testbed::{bin_dir, failpoint_bin_dir};

fn holds(binary: &[u8], needle: &[u8]) -> bool {
    binary.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_release_agent_contains_no_failpoint() -> Result<()> {
    let markers: [&[u8]; 2] = [b"DBMIGRATE_FAILPOINT", b"fault injected"];
    let release = std::fs::read(bin_dir()?.join("dbmigrate"))?;
    let test_build = std::fs::read(failpoint_bin_dir()?.join("dbmigrate"))?;
    for m in markers {
        let name = String::from_utf8_lossy(m);
        assert!(
            holds(&test_build, m),
            "the failpoint build lacks `{name}`: the check would see nothing"
        );
        assert!(
            !holds(&release, m),
            "the release dbmigrate contains `{name}`"
        );
    }
    Ok(())
}

#[test]
fn the_release_agent_names_its_protocol_version() -> Result<()> {
    let out = std::process::Command::new(bin_dir()?.join("dbmigrate"))
        .arg("--version")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("(protocol {})", dbmigrate_core::protocol::PROTOCOL_VERSION);
    assert!(out.status.success() && text.contains(&want), "{text}");
    Ok(())
}
