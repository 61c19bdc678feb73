//! What must hold for any capture file the load tester reads (loadtest/src/capture.rs): no
//! panic, and what it reads adds up (every frame counted once, inside the capture's span).

// Each includer uses a part: the fuzz targets leave out the seeds.
#![allow(dead_code)]

use synchub_loadtest::capture::Capture;

/// Body of the `loadtest_capture` target: the bytes are a capture file; the first byte picks
/// whether every tenant is kept or only `acme`.
pub fn loadtest_capture(bytes: &[u8]) {
    let Some((first, rest)) = bytes.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let tenants = if first & 1 == 0 { vec![] } else { vec!["acme".to_string()] };
    let Ok(capture) = Capture::parse(text, &tenants) else { return };
    let sessions = capture.devices.iter().flat_map(|d| &d.sessions);
    let frames: Vec<u64> = sessions.clone().flat_map(|s| s.frames.iter().map(|(t, _)| *t)).collect();
    assert_eq!(frames.len(), capture.frames, "frames counted once");
    assert!(frames.iter().all(|t| *t <= capture.span_us), "frames inside the span");
    assert!(sessions.clone().all(|s| s.start_us <= capture.span_us && s.end_us.map_or(true, |end| end <= capture.span_us)));
    assert!(capture.devices.iter().all(|d| tenants.is_empty() || tenants.contains(&d.tenant)), "only the tenants asked for");
}

/// Seeds: the protocol capture target's, kept for every tenant and for `acme` only.
pub fn seeds(testdata: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    super::capture::seeds(testdata)
        .into_iter()
        .flat_map(|(name, bytes)| [0u8, 1].map(|tenants| (format!("{name}-{tenants}"), [&[tenants][..], &bytes].concat())))
        .collect()
}
