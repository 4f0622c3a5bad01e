//! The TPC-C driver against a real MariaDB on this host: load a warehouse,
//! run the five transactions, check all nine consistency conditions; then
//! break one on purpose and see the check name it. Needs root and
//! `mariadbd` (scripts/setup.sh installs it).

use std::path::Path;
use std::process::{Command, Output};

use dbmigrate_testbed::HostMariadb;
use serde_json::Value;

fn bench(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("tpcc")
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .expect("running bench")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn load_run_and_check_on_real_mariadb() {
    let dir = std::env::temp_dir().join(format!("dbm-tpcc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let db = HostMariadb::start(&dir.join("data"), &dir, "256M").expect("starting the test server");
    let sock = db.socket.clone();

    // Before loading, the driver says what to do.
    let o = bench(&sock, &["run", "--duration-s", "1"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("bench tpcc load"), "{}", text(&o));
    let o = bench(&sock, &["load", "--warehouses", "0"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--warehouses must be"), "{}", text(&o));

    let o = bench(&sock, &["load", "--warehouses", "1"]);
    assert!(o.status.success(), "load: {}", text(&o));
    let o = bench(&sock, &["check", "--full"]);
    assert!(o.status.success(), "check after load: {}", text(&o));

    let lat = dir.join("latency");
    let o = bench(
        &sock,
        &[
            "run",
            "--terminals",
            "4",
            "--duration-s",
            "8",
            "--latency-dir",
            &lat.to_string_lossy(),
        ],
    );
    assert!(o.status.success(), "run: {}", text(&o));
    let s: Value = serde_json::from_slice(&o.stdout).expect("JSON summary");
    assert_eq!(s["errors"], 0, "{s}");
    assert_eq!(s["warehouses"], 1);
    let total = s["transactions"].as_u64().unwrap();
    assert!(total > 50, "{s}");
    assert!(s["tpmc"].as_f64().unwrap() > 0.0);
    for k in [
        "new_order",
        "payment",
        "order_status",
        "delivery",
        "stock_level",
    ] {
        assert!(
            s["by_kind"][k]["count"].as_u64().unwrap_or(0) > 0,
            "no {k}: {s}"
        );
        assert!(s["by_kind"][k]["p99_ms"].as_f64().unwrap() > 0.0);
    }
    // The mix: new-order about 45%, payment about 43%.
    let share = |k: &str| s["by_kind"][k]["count"].as_f64().unwrap() / total as f64;
    assert!((0.35..0.55).contains(&share("new_order")), "{s}");
    assert!((0.33..0.53).contains(&share("payment")), "{s}");
    // One latency-log line per transaction.
    let lines: usize = std::fs::read_dir(&lat)
        .unwrap()
        .map(|e| {
            std::fs::read_to_string(e.unwrap().path())
                .unwrap()
                .lines()
                .count()
        })
        .sum();
    assert_eq!(lines as u64, total);

    // The transactions kept the database consistent...
    let o = bench(&sock, &["check", "--full"]);
    assert!(o.status.success(), "check after run: {}", text(&o));
    // ...and the check does catch an inconsistent one.
    let o = Command::new("mariadb")
        .arg("-S")
        .arg(&sock)
        .args([
            "tpcc",
            "-e",
            "UPDATE district SET d_next_o_id = d_next_o_id + 1 WHERE d_w_id = 1 AND d_id = 4",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = bench(&sock, &["check"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("2 (D_NEXT_O_ID - 1"), "{}", text(&o));

    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
}
