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

/// `scripts/package.sh` into a scratch directory: both packages hold their
/// files (no failpoint in the packaged agent), the guest agent's unit is
/// one systemd accepts, and its maintainer scripts do nothing to a system
/// without systemd running.
#[test]
fn the_packages_hold_the_agents_and_a_valid_unit() -> Result<()> {
    let out = std::env::temp_dir().join(format!("dbm-packages-{}", std::process::id()));
    let made = std::process::Command::new("bash")
        .arg(dbmigrate_testbed::repo_root().join("scripts/package.sh"))
        .arg(&out)
        .output()?;
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let listed = String::from_utf8_lossy(&made.stdout).into_owned();
    let debs: Vec<&str> = listed.lines().filter(|l| l.ends_with(".deb")).collect();
    assert_eq!(debs.len(), 2, "{listed}");
    let contents = |deb: &str| -> Result<String> {
        let o = std::process::Command::new("dpkg-deb")
            .args(["--contents", deb])
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let host = contents(debs[0])?;
    for f in [
        "./usr/bin/dbmigrate",
        "./usr/lib/dbmigrate/libdbmigrate_preload.so",
    ] {
        assert!(host.contains(f), "{f} missing:\n{host}");
    }
    let guest = contents(debs[1])?;
    for f in [
        "./usr/sbin/dbmigrate-guest-agent",
        "./lib/systemd/system/dbmigrate-guest-agent.service",
        "./lib/udev/rules.d/60-dbmigrate-guest-agent.rules",
        "./etc/default/dbmigrate-guest-agent",
    ] {
        assert!(guest.contains(f), "{f} missing:\n{guest}");
    }
    // Unpacked: the agent runs, and systemd accepts its unit.
    let root = out.join("root");
    for deb in &debs {
        let x = std::process::Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(&root)
            .status()?;
        assert!(x.success());
    }
    let agent = std::process::Command::new(root.join("usr/sbin/dbmigrate-guest-agent"))
        .arg("--version")
        .output()?;
    assert!(agent.status.success());
    let packaged = std::fs::read(root.join("usr/bin/dbmigrate"))?;
    assert!(!holds(&packaged, b"DBMIGRATE_FAILPOINT"));
    let unit = root.join("lib/systemd/system/dbmigrate-guest-agent.service");
    let text = std::fs::read_to_string(&unit)?.replace(
        "/usr/sbin/dbmigrate-guest-agent",
        &root
            .join("usr/sbin/dbmigrate-guest-agent")
            .to_string_lossy(),
    );
    let check = out.join("dbmigrate-guest-agent.service");
    std::fs::write(&check, text)?;
    let verify = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&check)
        .output()?;
    let said = String::from_utf8_lossy(&verify.stderr).into_owned();
    // The device it binds to exists only in a VM with the port.
    let problems: Vec<&str> = said
        .lines()
        .filter(|l| !l.contains("virtio\\x2dports") && !l.trim().is_empty())
        .collect();
    assert!(problems.is_empty(), "systemd-analyze verify: {said}");
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
