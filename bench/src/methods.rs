//! The methods each comparison runs, and what a method's name says about it.

use anyhow::{bail, Result};
use serde_json::Value;

use crate::{Faults, Run};

/// The methods `bench` can run.
pub(crate) const METHODS: [&str; 5] = [
    "qemu-precopy",
    "qemu-postcopy",
    "dbmigrate-precopy",
    "dbmigrate-postcopy",
    "dbmigrate-hybrid",
];

/// Methods only `compare-db` runs: what TLS costs each migration (the
/// `mariadb-sysbench-tls` scenario): dbmigrate's pre-copy with its agents
/// on plain TCP (`--insecure-plaintext`; every other dbmigrate method runs
/// over mutual TLS), and QEMU's pre-copy with its own `tls-creds-x509`
/// (the same certificates); QEMU's best pre-copy (multifd, 2 channels,
/// zstd: [`crate::qemu::multifd_of`]); dbmigrate's pre-copy with the
/// adaptive pace at a budget of [`ADAPTIVE_BUDGET_PCT`]; dbmigrate's
/// pre-copy with the rebuild's storage reads at a fixed pace
/// ([`FIXED_PACES`]); dbmigrate's pre-copy with the guest's memory census
/// (`--page-census`: what the raw pages are); dbmigrate's pre-copy with the
/// destination reading the disk as a block device ([`reads_block_device`]);
/// dbmigrate's pre-copy with its raw pages not compressed (`--compress off`);
/// dbmigrate's pre-copy rebuilding the guest's clean page cache too
/// (`--hint-page-cache`, with the census to show it, and without it:
/// `-pagecache-nocensus`, what the hints alone cost and save); dbmigrate's
/// pre-copy with other storage read gaps ([`READ_GAPS`]); dbmigrate's
/// pre-copy with the destination's RAM allocated before it listens
/// ([`prealloc_upfront`]); dbmigrate's pre-copy of the VM as a libvirt
/// domain, each host with its own libvirtd ([`via_libvirt`]).
pub(crate) const DB_METHODS: [&str; 17] = [
    "dbmigrate-precopy-plaintext",
    "qemu-precopy-tls",
    "qemu-precopy-multifd",
    "dbmigrate-precopy-adaptive",
    FIXED_PACES[0].0,
    FIXED_PACES[1].0,
    "dbmigrate-precopy-census",
    "dbmigrate-precopy-blockdev",
    "dbmigrate-precopy-uncompressed",
    "dbmigrate-precopy-pagecache",
    "dbmigrate-precopy-pagecache-nocensus",
    READ_GAPS[0].0,
    READ_GAPS[1].0,
    READ_GAPS[2].0,
    "dbmigrate-precopy-upfront",
    "dbmigrate-precopy-libvirt",
    LIBVIRT_NUMA,
];

/// The libvirt method whose domain has two NUMA cells.
pub(crate) const LIBVIRT_NUMA: &str = "dbmigrate-precopy-libvirt-numa";

/// Whether `method` runs the VM as a libvirt domain (`migrate --libvirt
/// --domain`, `receive --libvirt --domain-xml`) instead of a QEMU the
/// bench starts itself (pure).
pub(crate) fn via_libvirt(method: &str) -> bool {
    method == "dbmigrate-precopy-libvirt" || method == LIBVIRT_NUMA
}

/// Methods that run dbmigrate's pre-copy with another longest stretch one
/// storage read goes through unasked (`receive --storage-read-gap`, KiB;
/// the default is 64; stop 29's `mariadb-sysbench-reads` ran with 0).
pub(crate) const READ_GAPS: [(&str, u32); 3] = [
    ("dbmigrate-precopy-gap0", 0),
    ("dbmigrate-precopy-gap16", 16),
    ("dbmigrate-precopy-gap64", 64),
];

/// The storage read gap of a method, KiB, if it sets one (pure).
pub(crate) fn read_gap(method: &str) -> Option<u32> {
    setting(&READ_GAPS, method)
}

/// The value `table` gives `method`, if it lists it (pure).
fn setting(table: &[(&str, u32)], method: &str) -> Option<u32> {
    table
        .iter()
        .find(|(name, _)| *name == method)
        .map(|&(_, v)| v)
}

/// Whether the destination of `method` reads the VM's disk as a local
/// block device (a read-only loop device over the image, as a host sees a
/// SAN LUN) rather than from the storage server over NBD (pure).
pub(crate) fn reads_block_device(method: &str) -> bool {
    method == "dbmigrate-precopy-blockdev"
}

/// Whether the destination of `method` allocates the guest's RAM before
/// it listens (`receive --prealloc upfront`, as QEMU's `prealloc=on` does
/// for QEMU's methods) instead of in the background (pure).
pub(crate) fn prealloc_upfront(method: &str) -> bool {
    method == "dbmigrate-precopy-upfront"
}

/// Methods that run dbmigrate's pre-copy with the destination's storage
/// reads at a fixed pace (`receive --storage-bandwidth`, MB/s): the
/// fixed paces the adaptive one is compared with.
pub(crate) const FIXED_PACES: [(&str, u32); 2] = [
    ("dbmigrate-precopy-pace100", 100),
    ("dbmigrate-precopy-pace200", 200),
];

/// The fixed storage pace of a method, MB/s, if it has one (pure).
pub(crate) fn fixed_pace(method: &str) -> Option<u32> {
    setting(&FIXED_PACES, method)
}

/// `dbmigrate-precopy-adaptive`'s `--guest-impact-budget`, percent.
pub(crate) const ADAPTIVE_BUDGET_PCT: &str = "10";

/// `dbmigrate migrate` arguments of a dbmigrate method, or None for QEMU's.
pub(crate) fn dbmigrate_mode(method: &str) -> Option<&'static [&'static str]> {
    match method {
        "dbmigrate-precopy" | "dbmigrate-precopy-plaintext" => Some(&["--mode", "precopy"]),
        m if fixed_pace(m).is_some() || read_gap(m).is_some() => Some(&["--mode", "precopy"]),
        "dbmigrate-precopy-census" => Some(&["--mode", "precopy", "--page-census"]),
        "dbmigrate-precopy-blockdev"
        | "dbmigrate-precopy-upfront"
        | "dbmigrate-precopy-libvirt"
        | LIBVIRT_NUMA => Some(&["--mode", "precopy"]),
        "dbmigrate-precopy-uncompressed" => Some(&["--mode", "precopy", "--compress", "off"]),
        "dbmigrate-precopy-pagecache" => {
            Some(&["--mode", "precopy", "--hint-page-cache", "--page-census"])
        }
        "dbmigrate-precopy-pagecache-nocensus" => Some(&["--mode", "precopy", "--hint-page-cache"]),
        "dbmigrate-precopy-adaptive" => Some(&[
            "--mode",
            "precopy",
            "--guest-impact-budget",
            ADAPTIVE_BUDGET_PCT,
        ]),
        "dbmigrate-postcopy" => Some(&["--mode", "postcopy", "--allow-postcopy"]),
        "dbmigrate-hybrid" => Some(&["--mode", "hybrid", "--allow-postcopy"]),
        _ => None,
    }
}

/// Whether a dbmigrate method may hand over by post-copy (its destination
/// QEMU then needs the post-copy socket).
pub(crate) fn may_postcopy(method: &str) -> bool {
    dbmigrate_mode(method).is_some_and(|m| m.contains(&"--allow-postcopy"))
}

/// Whether a method's agents talk plain TCP instead of mutual TLS.
pub(crate) fn plaintext_agents(method: &str) -> bool {
    method == "dbmigrate-precopy-plaintext"
}

/// Post-copy figures of a run: faults the destination took, those that
/// needed the network, and the longest a vCPU waited for a page.
pub(crate) fn postcopy_figures(dest: &Value, report: &Value) -> Option<Faults> {
    report["postcopy"].is_object().then(|| Faults {
        faults: dest["faults"].as_u64(),
        network_faults: dest["network_faults"].as_u64(),
        storage_faults: dest["storage_faults"].as_u64(),
        longest_stall_ms: dest["longest_stall_us"]
            .as_u64()
            .map(|us| us as f64 / 1000.0),
    })
}

/// "network faults / longest stall" cell of a table.
pub(crate) fn faults_cell(run: &Run) -> String {
    match &run.postcopy {
        None => "-".into(),
        Some(f) => format!(
            "{} / {}",
            f.network_faults.map_or("?".into(), |n| n.to_string()),
            f.longest_stall_ms
                .map_or("?".into(), |ms| format!("{ms:.0} ms"))
        ),
    }
}

pub(crate) fn check_methods(methods: &[String]) -> Result<()> {
    for m in methods {
        if !METHODS.contains(&m.as_str()) && m != "qemu-precopy-tls" {
            bail!("unknown method `{m}`: use {}", METHODS.join(", "));
        }
    }
    Ok(())
}

/// Reference runs of `compare-db` that migrate nothing: the destination
/// host only reads the VM's disk from shared storage while the load runs,
/// each with whether it reads through a second storage server.
pub(crate) const STORAGE_READS: [(&str, bool); 2] =
    [("storage-read", false), ("storage-read-separate", true)];

/// Whether `method` is a storage-read reference, and if so whether it
/// reads through a second storage server (pure).
pub(crate) fn storage_read_server(method: &str) -> Option<bool> {
    STORAGE_READS
        .iter()
        .find(|(name, _)| *name == method)
        .map(|&(_, separate)| separate)
}

/// [`check_methods`] for `compare-db`, which also takes the control run
/// (`none`) and the storage-read references.
pub(crate) fn check_db_methods(methods: &[String]) -> Result<()> {
    for m in methods {
        if !METHODS.contains(&m.as_str())
            && !DB_METHODS.contains(&m.as_str())
            && m != crate::guest_cost::CONTROL
            && storage_read_server(m).is_none()
        {
            let refs: Vec<&str> = STORAGE_READS.iter().map(|(name, _)| *name).collect();
            bail!(
                "unknown method `{m}`: use {}, {}, the control `{}` (no migration), or the references {}",
                METHODS.join(", "),
                DB_METHODS.join(", "),
                crate::guest_cost::CONTROL,
                refs.join(", ")
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_paces_are_precopy_methods_with_their_pace() {
        assert_eq!(fixed_pace("dbmigrate-precopy-pace100"), Some(100));
        assert_eq!(read_gap("dbmigrate-precopy-gap64"), Some(64));
        assert_eq!(read_gap("dbmigrate-precopy"), None);
        assert!(prealloc_upfront("dbmigrate-precopy-upfront"));
        assert!(!prealloc_upfront("dbmigrate-precopy"));
        assert_eq!(
            dbmigrate_mode("dbmigrate-precopy-gap16"),
            Some(&["--mode", "precopy"][..])
        );
        assert_eq!(fixed_pace("dbmigrate-precopy-pace200"), Some(200));
        assert_eq!(fixed_pace("dbmigrate-precopy"), None);
        assert_eq!(fixed_pace("dbmigrate-precopy-adaptive"), None);
        for (m, _) in FIXED_PACES {
            assert_eq!(dbmigrate_mode(m), Some(&["--mode", "precopy"][..]));
            assert!(check_db_methods(&[m.to_string()]).is_ok());
            assert!(!may_postcopy(m));
        }
    }
}
