//! `dbmigrate-precopy-libvirt`: the same VM, links and load as
//! `dbmigrate-precopy`, run as a libvirt domain on a libvirtd per host
//! (the test bed's [`LibvirtHost`]), moved with `migrate --libvirt
//! --domain` and `receive --libvirt --domain-xml`: what going through
//! libvirt costs a migration. `dbmigrate-precopy-libvirt-numa`: the same
//! domain with two NUMA cells (a memory backend and file each).

use std::time::Duration;

use anyhow::Result;
use dbmigrate_testbed::libvirt::{domain_vm, DomainMemory, LibvirtHost};
use dbmigrate_testbed::{DbBed, MariadbGuest};
use serde_json::json;

use crate::db::{self, DbSetup, SourceVia};
use crate::Run;

/// The domain's name on both hosts.
const DOMAIN: &str = "db";

/// One run of a libvirt method on `bed`.
pub(crate) fn run(s: &DbSetup, guest: &MariadbGuest, bed: &DbBed, method: &str) -> Result<Run> {
    let probe = crate::storage_probe::probe(s, bed, &db::rebuild_storage(bed, 0, method)?);
    let src_lv = LibvirtHost::start(&bed.tb, &bed.tb.src_ns, "src")?;
    let dst_lv = LibvirtHost::start(&bed.tb, &bed.tb.dst_ns, "dst")?;
    let mem = DomainMemory {
        numa_cells: if method == crate::methods::LIBVIRT_NUMA {
            2
        } else {
            1
        },
        ..DomainMemory::new(s.ram_mib, &s.pool)
    };
    let src_files = bed.domain_xml(DOMAIN, &src_lv, guest, true, mem)?;
    let dst_files = bed.domain_xml(DOMAIN, &dst_lv, guest, false, mem)?;
    let src = bed.start_domain(&src_lv, DOMAIN, &src_files)?;
    s.hosts.pin_bed(bed)?;
    src.wait_console("DBM-READY pool", Duration::from_secs(900))?;
    // The destination agent starts the waiting domain, then listens.
    let cmd = bed.tb.receive_cmd_libvirt(&dst_lv.uri, &dst_files.xml);
    let recv = db::spawn_receiver(s, bed, 0, cmd, None, method)?;
    let dst = domain_vm(&dst_lv, DOMAIN, &dst_files)?;
    s.hosts.pin_bed(bed)?;
    let via = || SourceVia::Libvirt {
        uri: &src_lv.uri,
        domain: DOMAIN,
        hints: &src_files.hints,
    };
    let mut run = db::under_load(s, guest, bed, || {
        let before = bed.tb.link_bytes()?;
        let run = db::migrate_slot_via(s, bed, 0, (&src, &dst), Some(recv), method, via())?;
        Ok((run, Some(bed.tb.link_bytes()? - before)))
    })?;
    db::check_after(s, bed, &bed.vm_ip, &dst, &mut run);
    // libvirt's view afterwards, beside the source agent's own account.
    let view = json!({
        "source": src_lv.state(DOMAIN).ok().flatten(),
        "destination": dst_lv.state(DOMAIN).ok().flatten(),
        "destination_persistent": dst_lv.persistent(DOMAIN).ok(),
    });
    if let Some(d) = run.detail.as_object_mut() {
        d.insert("libvirt_view".into(), view);
    }
    match probe {
        Ok(p) => db::with_measured_bound(s, &mut run, p),
        Err(e) => eprintln!("   {method}: {e:#}"),
    }
    drop((src, dst));
    Ok(run)
}
