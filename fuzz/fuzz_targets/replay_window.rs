//! The anti-replay window against a model: a sequence number is accepted
//! exactly once, and never when it is a window or more behind the top.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use ovl_agent::dataplane::encrypted::replay::{ReplayWindow, WINDOW};

fuzz_target!(|steps: Vec<(u16, bool)>| {
    let mut w = ReplayWindow::new();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut top = 0u64; // one past the highest accepted
    let mut base = 0u64;
    for (delta, jump) in steps {
        // Mostly near the top, sometimes far ahead.
        base = if jump {
            base.saturating_add(u64::from(delta) * 64)
        } else {
            base
        };
        let seq = (base + u64::from(delta % 8192)).saturating_sub(4096);
        let fresh = !seen.contains(&seq) && seq + WINDOW >= top;
        let checked = w.check(seq).is_ok();
        let recorded = w.record(seq).is_ok();
        assert_eq!(checked, recorded, "check and record agree for {seq}");
        if recorded {
            assert!(!seen.contains(&seq), "{seq} accepted twice");
            seen.insert(seq);
            top = top.max(seq + 1);
        } else {
            // Refusing what is old is allowed; refusing a fresh number
            // inside the window is not.
            assert!(
                !fresh || seq + WINDOW < top + 1,
                "fresh {seq} refused (top {top})"
            );
        }
    }
});
