//! The self-test on lavapipe (Vulkan on the CPU) through the library, as `qwen-vl selftest`
//! runs it: kernel conformance (f32, and f16 where the adapter has shader-f16) and the bundled
//! fixture's HF parity under forced and free-running greedy decoding. Plus the two CLI
//! contracts that cost nothing: `devices --json` and a bad `--adapter`.

use std::process::Command;

use qwen_vl::device::{enumerate_adapters, AdapterEntry};
use qwen_vl::selftest::{self, Fixture};

/// lavapipe, or `None` (a failure under CI=true, where it is installed).
fn lavapipe() -> Option<AdapterEntry> {
    let adapters = enumerate_adapters();
    let found = adapters
        .iter()
        .find(|a| a.backend == "vulkan" && a.device_type == "cpu")
        .cloned();
    if found.is_none() {
        let names: Vec<String> = adapters
            .iter()
            .map(|a| format!("{} ({}, {})", a.name, a.backend, a.device_type))
            .collect();
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but no Vulkan CPU adapter (lavapipe) among {names:?}");
        }
        eprintln!("SKIP: no lavapipe among {names:?}");
    }
    found
}

#[test]
fn selftest_passes_on_lavapipe() {
    let Some(adapter) = lavapipe() else { return };
    let fixture = Fixture::load(&selftest::default_fixture()).expect("CPU reference");
    assert!(
        fixture.reference_ok(),
        "the CPU backend itself differs from HF: {:?}",
        fixture.reference
    );
    let row = selftest::check_row(adapter.clone(), std::slice::from_ref(&fixture));
    let check = row
        .check
        .unwrap_or_else(|| panic!("lavapipe could not be checked: {:?}", row.error));
    println!(
        "lavapipe: kernels {}/{} ({:.1} s), worst f32 {:.2e}, worst f16 {:?}; logits worst {:.2e}; {:?}",
        check.kernels.cases - check.kernels.failed,
        check.kernels.cases,
        check.kernels.seconds,
        check.kernels.worst_f32,
        check.kernels.worst_f16,
        check.worst_logits_err,
        check.timing
    );
    assert!(
        check.kernels.failed == 0,
        "kernel cases failed on lavapipe: {:?}",
        check.kernels.failures
    );
    assert_eq!(
        check.kernels.wgsl_cases, check.kernels.cases,
        "every case fits lavapipe's limits, so the WGSL kernels must take all of them"
    );
    assert_eq!(
        check.kernels.worst_f16.is_some(),
        adapter.features.shader_f16,
        "f16 kernels are checked exactly when the adapter reports shader-f16"
    );
    for g in &check.goldens {
        assert!(
            g.pass,
            "{} on lavapipe: logits max |diff| {:.2e} (tol {:.0e}), top-1 vs CPU {}/{} (first difference at {:?}), greedy = HF {:?}, error {:?}",
            g.golden,
            g.logits_max_err,
            selftest::LOGIT_TOL,
            g.top1_agree,
            g.positions,
            g.first_disagreement,
            g.greedy_match,
            g.error
        );
    }
    assert_eq!(
        check.goldens.len(),
        fixture.goldens.len(),
        "every golden checked"
    );
    assert!(check.pass && row.pass);
}

#[test]
fn devices_json_is_one_object_listing_lavapipe_with_limits() {
    let Some(_) = lavapipe() else { return };
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-vl"))
        .args(["devices", "--json"])
        .output()
        .expect("run qwen-vl devices");
    assert!(out.status.success(), "devices --json failed: {out:?}");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is exactly one JSON object");
    let adapters = v["adapters"].as_array().expect("`adapters` array");
    let lvp = adapters
        .iter()
        .find(|a| a["backend"] == "vulkan" && a["device_type"] == "cpu")
        .unwrap_or_else(|| panic!("no lavapipe in {v}"));
    assert!(
        lvp["limits"]["max_storage_buffer_binding_size"]
            .as_u64()
            .is_some_and(|b| b > 0),
        "{lvp}"
    );
    assert!(lvp["features"]["shader_f16"].is_boolean(), "{lvp}");
    for (i, a) in adapters.iter().enumerate() {
        assert_eq!(a["index"], i, "indices are positions: {a}");
    }
}

#[test]
fn selftest_rejects_an_adapter_index_that_does_not_exist() {
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-vl"))
        .args(["selftest", "--adapter", "4242"])
        .output()
        .expect("run qwen-vl selftest");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit code 0 for a missing adapter");
    // Mesa's EGL (wgpu's GL backend) prints its own `error: XDG_RUNTIME_DIR ...` line on
    // machines without a session; that one is not ours.
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error:") && !l.contains("XDG_RUNTIME_DIR"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    assert!(
        errors[0].contains("4242") || errors[0].contains("no adapter"),
        "{stderr}"
    );
}

/// `qwen-vl selftest --adapter all --json`, as a user runs it: every adapter wgpu finds here
/// (lavapipe on Vulkan; llvmpipe on GL where wgpu's GL backend works headless) gets a row, every
/// row passes, and the exit code says so.
#[test]
fn selftest_cli_passes_on_every_adapter() {
    let Some(_) = lavapipe() else { return };
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-vl"))
        .args(["selftest", "--adapter", "all", "--json"])
        .output()
        .expect("run qwen-vl selftest");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let rows = report["adapters"].as_array().expect("`adapters` array");
    let adapters = enumerate_adapters();
    assert_eq!(rows.len(), adapters.len(), "one row per adapter: {report}");
    for row in rows {
        println!(
            "{} ({}): pass {}, seconds {}",
            row["adapter"]["name"], row["adapter"]["backend"], row["pass"], row["seconds"]
        );
        assert_eq!(row["pass"], true, "adapter row failed: {row}");
    }
    assert_eq!(report["pass"], true, "{report}");
    assert!(
        out.status.success(),
        "exit code {:?} with every row passing",
        out.status
    );
}
