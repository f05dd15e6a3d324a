//! Cost of patches per synced object, with warm compiled patches, as a ratio against a floor
//! measured in the same run (cloning and re-serialising the object, which any sync does anyway).
//!
//! Run: `cargo bench -p rcsync-core --bench patches`

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use rcsync_core::RuntimeClassSync;
use rcsync_core::patches::TenantPatches;
use rcsync_core::script::ScriptLimits;
use serde_json::{Value, json};

fn per_iteration(mut f: impl FnMut()) -> Duration {
    // Warm up, then time enough iterations to take about half a second.
    for _ in 0..1_000 {
        f();
    }
    let mut n = 1_000u32;
    loop {
        let started = Instant::now();
        for _ in 0..n {
            f();
        }
        let elapsed = started.elapsed();
        if elapsed > Duration::from_millis(500) {
            return elapsed / n;
        }
        n *= 2;
    }
}

fn main() {
    let class = json!({
        "metadata": {"name": "gvisor", "labels": {"environment": "development", "kubernetes.io/runtime.class": "gvisor"}},
        "handler": "runsc",
        "overhead": {"podFixed": {"cpu": "250m", "memory": "64Mi"}},
        "scheduling": {"nodeSelector": {"sandbox": "gvisor"}, "tolerations": [{"key": "sandbox", "operator": "Exists"}]}
    });
    let config = RuntimeClassSync::parse_vcluster_yaml(
        Path::new("bench.yaml"),
        r#"sync: {fromHost: {runtimeClasses: {enabled: true, patches: [
            {path: metadata.name, expression: 'value === "gvisor" ? "sandboxed" : value'},
            {path: metadata.labels.environment, expression: '"tenant-" + value'},
            {path: 'scheduling.tolerations[*].key', expression: 'value.toUpperCase()'}]}}}"#,
    )
    .expect("the benchmark config is valid");
    let patches = TenantPatches::compile(
        "team-a",
        "vcluster-team-a",
        &config.patches,
        ScriptLimits::default(),
    )
    .expect("the benchmark patches compile");

    let floor = per_iteration(|| {
        let copy: Value = serde_json::from_str(&serde_json::to_string(black_box(&class)).unwrap()).unwrap();
        black_box(copy);
    });
    let patched = per_iteration(|| {
        black_box(patches.to_virtual(black_box(&class)).unwrap());
    });
    let evaluations = 4; // one name, one label, two tolerations
    println!("floor (JSON round trip of the object): {floor:?} per object");
    println!(
        "3 patches, {evaluations} evaluations:   {patched:?} per object ({:?} per evaluation)",
        patched / evaluations
    );
    println!(
        "ratio patched / floor: {:.1}",
        patched.as_secs_f64() / floor.as_secs_f64()
    );
}
