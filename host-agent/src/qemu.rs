//! What dbmigrate needs to know about and ask of a QEMU: its RAM backend,
//! guest-physical layout, migration capabilities and device-state migration.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thiserror::Error;

use crate::qmp::{Qmp, QmpError};

/// How to start QEMU so that dbmigrate can move its RAM.
pub const RAM_BACKEND_HINT: &str = "start QEMU with `-object memory-backend-file,id=ram0,size=<RAM>,mem-path=/dev/shm/<name>,share=on -machine <type>,memory-backend=ram0`";

/// QEMU-side failures.
#[derive(Debug, Error)]
pub enum VmError {
    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// Guest RAM is not in a shared file.
    #[error("guest RAM of the QEMU at {qmp} is not usable: {problem}; {RAM_BACKEND_HINT}")]
    Backend {
        /// QMP socket.
        qmp: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Device-state migration failed.
    #[error("QEMU device-state migration ended `{status}`: {detail}")]
    Migration {
        /// Final status.
        status: String,
        /// QEMU's error text.
        detail: String,
    },
}

/// The memory backend holding guest RAM.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RamBackend {
    /// QOM id (e.g. `ram0`).
    pub id: String,
    /// File that holds the RAM.
    pub mem_path: PathBuf,
    /// Bytes.
    pub size: u64,
}

pub use dbmigrate_core::addr::GpaRange;
use dbmigrate_core::addr::{GuestAddr, RamOffset};
use dbmigrate_core::protocol::guest::{clean_id, DiskId};
use dbmigrate_core::protocol::MAX_HELLO_RAM_FILES;

/// The VM's disks with a medium, in QEMU's order (`query-block`),
/// skipping CD-ROMs and floppies: each one's size, and its serial and WWN
/// as the disk device's properties give them (empty where it has none).
/// Hint disk indexes are indexes in this list.
pub async fn disks(qmp: &mut Qmp) -> Result<Vec<DiskId>, VmError> {
    let blocks = qmp.execute("query-block", None).await?;
    let mut out = Vec::new();
    for (bytes, qdev) in parse_disks(&blocks) {
        let mut d = DiskId {
            bytes,
            ..DiskId::default()
        };
        if let Some(path) = qdev {
            if let Value::String(s) = device_property(qmp, &path, "serial").await? {
                d.serial = clean_id(&s);
            }
            if let Some(w) = device_property(qmp, &path, "wwn")
                .await?
                .as_u64()
                .filter(|&w| w != 0)
            {
                d.wwn = format!("0x{w:016x}");
            }
        }
        out.push(d);
    }
    Ok(out)
}

/// Property `prop` of the device at `qdev` (a QOM path, or a device id as
/// `query-block` gives it for a device that has one); null where the
/// device has no such property (virtio-blk has no WWN). A failed
/// connection is an error.
async fn device_property(qmp: &mut Qmp, qdev: &str, prop: &str) -> Result<Value, VmError> {
    let path = if qdev.starts_with('/') {
        qdev.to_string()
    } else {
        format!("/machine/peripheral/{qdev}")
    };
    match qmp
        .execute("qom-get", Some(json!({"path": path, "property": prop})))
        .await
    {
        Ok(v) => Ok(v),
        Err(QmpError::Command { .. }) => Ok(Value::Null),
        Err(e) => Err(e.into()),
    }
}

/// The pure part of [`disks`]: each disk's size and its device's QOM path.
pub fn parse_disks(blocks: &Value) -> Vec<(u64, Option<String>)> {
    blocks
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|b| !b["removable"].as_bool().unwrap_or(false))
        .filter_map(|b| {
            let size = b["inserted"]["image"]["virtual-size"].as_u64()?;
            Some((size, b["qdev"].as_str().map(str::to_string)))
        })
        .collect()
}

/// Finds the memory backends that hold the guest's RAM and checks that
/// each is a shared file: the machine's `memory-backend`, or without one
/// the backends of its NUMA nodes (`-numa node,memdev=`: the memory
/// backends mapped into the guest except those of memory devices such as
/// DIMMs, together the guest's base memory). Several are given in the
/// order of their lowest guest-physical address, which both hosts' QEMUs
/// agree on for the same machine options whatever the backends are named;
/// their pages follow each other in that order. A memory device on a
/// shared backend is refused: QEMU with `x-ignore-shared` would not move
/// it, and dbmigrate moves the base memory only.
pub async fn ram_backends(qmp: &mut Qmp) -> Result<Vec<RamBackend>, VmError> {
    let devices = qmp.execute("query-memory-devices", None).await?;
    for id in device_memdevs(&devices) {
        if qmp
            .execute(
                "qom-get",
                Some(json!({"path": format!("/objects/{id}"), "property": "share"})),
            )
            .await?
            == Value::Bool(true)
        {
            return Err(backend_error(qmp, format!("memory device backend {id} is shared (share=on): QEMU's migration with x-ignore-shared would leave its contents behind and dbmigrate moves the guest's base memory only; give memory devices (DIMMs) backends with share=off")));
        }
    }
    let mb = qmp
        .execute(
            "qom-get",
            Some(json!({"path": "/machine", "property": "memory-backend"})),
        )
        .await;
    if let Ok(Value::String(p)) = &mb {
        if !p.is_empty() {
            return Ok(vec![ram_backend(qmp, p).await?]);
        }
    }
    let memdevs = qmp.execute("query-memdev", None).await?;
    let mtree = mtree_text(qmp).await?;
    let candidates = node_memdevs(&memdevs, &devices);
    let (ids, unmapped) = in_gpa_order(&candidates, &mtree);
    if !unmapped.is_empty() {
        tracing::warn!(
            ?unmapped,
            "memory backends not mapped into the guest are not its RAM: left out"
        );
    }
    if ids.is_empty() {
        return Err(backend_error(
            qmp,
            "the machine has no `memory-backend` property set and no NUMA node has a memdev".into(),
        ));
    }
    if ids.len() > MAX_HELLO_RAM_FILES {
        return Err(backend_error(qmp, format!("the guest's RAM is in {} memory backends; dbmigrate moves at most {MAX_HELLO_RAM_FILES}", ids.len())));
    }
    let mut out = Vec::with_capacity(ids.len());
    for id in &ids {
        out.push(ram_backend(qmp, id).await?);
    }
    let summary = qmp.execute("query-memory-size-summary", None).await?;
    let base = summary["base-memory"].as_u64();
    let sum: u64 = out.iter().map(|b| b.size).sum();
    if base.is_some_and(|b| b != sum) {
        return Err(backend_error(qmp, format!("the memory backends {ids:?} hold {sum} bytes but the guest's base memory is {} bytes: one of them is not a NUMA node's (an ivshmem region?); dbmigrate moves the nodes' backends only", base.unwrap_or(0))));
    }
    Ok(out)
}

/// The ids of the backends memory devices (DIMMs, virtio-mem...) use,
/// from `query-memory-devices`. Pure.
pub fn device_memdevs(devices: &Value) -> Vec<String> {
    devices
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|d| d["data"]["memdev"].as_str())
        .map(|p| p.rsplit('/').next().unwrap_or(p).to_string())
        .collect()
}

/// The RAM files of `backends`, in their order.
pub fn ram_files(backends: &[RamBackend]) -> Vec<dbmigrate_core::ram::RamFile> {
    backends
        .iter()
        .map(|b| dbmigrate_core::ram::RamFile {
            path: b.mem_path.clone(),
            size: b.size,
        })
        .collect()
}

/// A [`VmError::Backend`] for the QEMU behind `qmp`.
fn backend_error(qmp: &Qmp, problem: String) -> VmError {
    VmError::Backend {
        qmp: qmp.path().to_path_buf(),
        problem,
    }
}

/// The memory backends that may be NUMA nodes': every backend
/// `query-memdev` lists (`memdevs`) but those `query-memory-devices`
/// (`devices`) uses. Pure.
pub fn node_memdevs(memdevs: &Value, devices: &Value) -> Vec<String> {
    let used = device_memdevs(devices);
    memdevs
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .filter(|id| !used.iter().any(|u| u == id))
        .map(str::to_string)
        .collect()
}

/// `ids` in the order of the lowest guest-physical address each is mapped
/// at in `info mtree -f`'s text, and apart those mapped nowhere. Pure.
pub fn in_gpa_order(ids: &[String], mtree: &str) -> (Vec<String>, Vec<String>) {
    let mut at = Vec::with_capacity(ids.len());
    let mut unmapped = Vec::new();
    for id in ids {
        match parse_mtree(mtree, id).first() {
            Some(r) => at.push((r.gpa, id.clone())),
            None => unmapped.push(id.clone()),
        }
    }
    at.sort();
    (at.into_iter().map(|(_, id)| id).collect(), unmapped)
}

/// The backend at QOM path or id `path`, checked to be a shared file.
async fn ram_backend(qmp: &mut Qmp, path: &str) -> Result<RamBackend, VmError> {
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/objects/{path}")
    };
    let get = |prop: &'static str| json!({"path": path, "property": prop});
    let mem_path = match qmp.execute("qom-get", Some(get("mem-path"))).await {
        Ok(Value::String(p)) => PathBuf::from(p),
        _ => {
            return Err(backend_error(
                qmp,
                format!("backend {path} is not a memory-backend-file (no mem-path)"),
            ))
        }
    };
    let share = qmp.execute("qom-get", Some(get("share"))).await?;
    if share != Value::Bool(true) {
        return Err(backend_error(
            qmp,
            format!("backend {path} has share=off, so the RAM file does not see guest writes"),
        ));
    }
    let size = qmp
        .execute("qom-get", Some(get("size")))
        .await?
        .as_u64()
        .ok_or_else(|| backend_error(qmp, format!("backend {path} reports no size")))?;
    Ok(RamBackend {
        id: path.rsplit('/').next().unwrap_or(&path).to_string(),
        mem_path,
        size,
    })
}

/// QEMU's flat memory map (`info mtree -f`).
async fn mtree_text(qmp: &mut Qmp) -> Result<String, VmError> {
    let text = qmp
        .execute(
            "human-monitor-command",
            Some(json!({"command-line": "info mtree -f"})),
        )
        .await?;
    Ok(text.as_str().unwrap_or("").to_string())
}

/// Guest-physical layout of the backends, read from `info mtree -f`:
/// each range's offset is in the run of the backends' files, one after
/// the other in `backends`' order.
pub async fn gpa_layout(qmp: &mut Qmp, backends: &[RamBackend]) -> Result<Vec<GpaRange>, VmError> {
    Ok(run_layout(&mtree_text(qmp).await?, backends))
}

/// [`parse_mtree`] of each backend, shifted to its place in the run. Pure.
pub fn run_layout(mtree: &str, backends: &[RamBackend]) -> Vec<GpaRange> {
    let mut out = Vec::new();
    let mut start = 0u64;
    for b in backends {
        out.extend(parse_mtree(mtree, &b.id).into_iter().map(|r| GpaRange {
            offset: RamOffset(r.offset.0 + start),
            ..r
        }));
        start += b.size;
    }
    out.sort_by_key(|r| r.gpa);
    out
}

/// Parses `info mtree -f` lines like
/// `0000000000100000-000000000fffffff (prio 0, ram): ram0 @0000000000100000`.
pub fn parse_mtree(text: &str, backend_id: &str) -> Vec<GpaRange> {
    let mut out: Vec<GpaRange> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some((range, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some((_, region)) = rest.split_once("): ") else {
            continue;
        };
        if !rest.contains(", ram") {
            continue;
        }
        let mut words = region.split_whitespace();
        if words.next() != Some(backend_id) {
            continue;
        }
        let offset = words
            .find_map(|w| w.strip_prefix('@'))
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or(0);
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        if b < a {
            continue;
        }
        let r = GpaRange {
            gpa: GuestAddr(a),
            len: b - a + 1,
            offset: RamOffset(offset),
        };
        if !out.contains(&r) {
            out.push(r);
        }
    }
    out.sort_by_key(|r| r.gpa);
    out
}

/// Sets a migration capability and returns its previous state.
pub async fn set_capability(qmp: &mut Qmp, name: &str, on: bool) -> Result<bool, VmError> {
    let caps = qmp.execute("query-migrate-capabilities", None).await?;
    let prev = caps
        .as_array()
        .and_then(|a| a.iter().find(|c| c["capability"] == name))
        .and_then(|c| c["state"].as_bool())
        .unwrap_or(false);
    if prev != on {
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": name, "state": on}]})),
        )
        .await?;
    }
    Ok(prev)
}

/// Polls `query-migrate` until the migration completes; error on failure or after `limit`.
pub async fn wait_migration(qmp: &mut Qmp, limit: Duration) -> Result<Value, VmError> {
    let t = Instant::now();
    loop {
        let v = qmp.execute("query-migrate", None).await?;
        let status = v["status"].as_str().unwrap_or("none").to_string();
        match status.as_str() {
            "completed" => return Ok(v),
            "failed" | "cancelled" => {
                return Err(VmError::Migration {
                    status,
                    detail: v["error-desc"].as_str().unwrap_or("no detail").into(),
                })
            }
            _ => {}
        }
        if t.elapsed() > limit {
            return Err(VmError::Migration {
                status,
                detail: format!("not finished after {} s", limit.as_secs()),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn disk_sizes_skip_cdroms_and_empty_drives() {
        let v = serde_json::json!([
            {"device": "virtio0", "qdev": "/machine/peripheral/d0/virtio-backend", "removable": false, "inserted": {"image": {"virtual-size": 8589934592u64}}},
            {"device": "ide1-cd0", "removable": true, "inserted": {"image": {"virtual-size": 1000}}},
            {"device": "floppy0", "removable": true},
            {"device": "virtio1", "removable": false, "inserted": {"image": {"virtual-size": 4096}}}
        ]);
        let sizes: Vec<u64> = super::parse_disks(&v).iter().map(|d| d.0).collect();
        assert_eq!(sizes, vec![8589934592, 4096]);
        assert_eq!(
            super::parse_disks(&v)[0].1.as_deref(),
            Some("/machine/peripheral/d0/virtio-backend")
        );
        assert!(super::parse_disks(&serde_json::json!({"bad": 1})).is_empty());
    }

    use super::*;

    /// `info mtree -f` of a two-node pc guest of 4 GiB (3 + 1), QEMU 7.2.
    const NUMA_MTREE: &str = "FlatView #0\n Root memory region: system\n  0000000000000000-00000000000bffff (prio 0, ram): ram-node0\n  0000000000100000-00000000bfffffff (prio 0, ram): ram-node0 @0000000000100000\n  0000000100000000-000000013fffffff (prio 0, ram): ram-node1\n";

    #[test]
    fn numa_backends_in_guest_physical_order_and_their_place_in_the_run() {
        // query-memdev lists them in no useful order; a DIMM's is not a node's.
        let memdevs = serde_json::json!([
            {"id": "ram-node1", "size": 1u64 << 30},
            {"id": "dimm0", "size": 1u64 << 30},
            {"id": "ram-node0", "size": 3u64 << 30}
        ]);
        let devices = serde_json::json!([
            {"type": "dimm", "data": {"memdev": "/objects/dimm0", "addr": 0}}
        ]);
        let ids = node_memdevs(&memdevs, &devices);
        assert_eq!(ids, vec!["ram-node1", "ram-node0"]);
        let (ordered, unmapped) = in_gpa_order(&ids, NUMA_MTREE);
        assert_eq!(ordered, vec!["ram-node0", "ram-node1"]);
        assert!(unmapped.is_empty());
        let (none, unmapped) = in_gpa_order(&["spare".to_string()], NUMA_MTREE);
        assert!(none.is_empty() && unmapped == vec!["spare"]);
        assert_eq!(device_memdevs(&devices), vec!["dimm0"]);
        let backends: Vec<RamBackend> = [("ram-node0", 3u64 << 30), ("ram-node1", 1 << 30)]
            .iter()
            .map(|(id, size)| RamBackend {
                id: id.to_string(),
                mem_path: PathBuf::from(format!("/dev/shm/{id}")),
                size: *size,
            })
            .collect();
        let layout = run_layout(NUMA_MTREE, &backends);
        assert_eq!(
            layout.last(),
            Some(&GpaRange {
                gpa: GuestAddr(0x1_0000_0000),
                len: 1 << 30,
                offset: RamOffset(3 << 30)
            }),
            "node 1's memory follows node 0's file"
        );
        assert_eq!(layout[1].offset, RamOffset(0x100000));
    }

    #[test]
    fn mtree_ranges_of_the_backend() {
        let text = "FlatView #0\n AS \"memory\", root: system\n Root memory region: system\n  0000000000000000-00000000000bffff (prio 0, ram): ram0\n  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom\n  0000000000100000-000000000fffffff (prio 0, ram): ram0 @0000000000100000\n  0000000100000000-000000013fffffff (prio 0, ram): ram0 @0000000080000000 KVM\n  0000000000000000-00000000000bffff (prio 0, ram): ram0\n  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram\n";
        let r = parse_mtree(text, "ram0");
        assert_eq!(
            r,
            vec![
                GpaRange {
                    gpa: GuestAddr(0),
                    len: 0xc0000,
                    offset: RamOffset(0)
                },
                GpaRange {
                    gpa: GuestAddr(0x100000),
                    len: 0xff00000,
                    offset: RamOffset(0x100000)
                },
                GpaRange {
                    gpa: GuestAddr(0x1_0000_0000),
                    len: 0x4000_0000,
                    offset: RamOffset(0x8000_0000)
                },
            ]
        );
        assert!(parse_mtree("garbage\n-\n", "ram0").is_empty());
    }
}
