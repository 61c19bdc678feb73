//! Hand-written SVG plot of a run's per-second timeline: throughput (changes merged/s, deltas
//! delivered/s) in the upper panel, ack p99 latency and hub RSS in the lower, on a shared time axis.

use std::fmt::Write;

use crate::report::Tick;

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 560.0;
const PLOT_LEFT: f64 = 70.0;
const PLOT_RIGHT: f64 = 830.0;

const MERGED_COLOUR: &str = "#1f77b4";
const DELTAS_COLOUR: &str = "#ff7f0e";
const LATENCY_COLOUR: &str = "#d62728";
const RSS_COLOUR: &str = "#2ca02c";

/// Vertical extent of one panel in pixels (`top` < `bottom`).
#[derive(Clone, Copy)]
struct Panel { top: f64, bottom: f64 }

const THROUGHPUT: Panel = Panel { top: 60.0, bottom: 260.0 };
const LATENCY: Panel = Panel { top: 310.0, bottom: 490.0 };

impl Panel {
    /// Pixel row of `value` on an axis running from 0 (bottom) to `max` (top).
    fn y(self, value: f64, max: f64) -> f64 {
        let fraction = (sanitize(value) / max).clamp(0.0, 1.0);
        self.bottom - fraction * (self.bottom - self.top)
    }
}

/// Pixel column of `t_s` on a time axis running from 0 to `t_max`.
fn x_pixel(t_s: f64, t_max: f64) -> f64 {
    PLOT_LEFT + (sanitize(t_s) / t_max).clamp(0.0, 1.0) * (PLOT_RIGHT - PLOT_LEFT)
}

/// NaN, ±inf and negatives plot as 0: one bad sample must not poison the whole document.
fn sanitize(value: f64) -> f64 {
    if value.is_finite() && value > 0.0 { value } else { 0.0 }
}

fn peak(values: impl Iterator<Item = f64>) -> f64 {
    values.map(sanitize).fold(0.0, f64::max)
}

/// Axis maxima are 1, 2, 2.5 or 5 × 10^k, each paired with the gridline count that keeps the
/// steps round (0.2, 0.5, 0.5, 1 × 10^k); 10 closes the decade in case log10 rounded down.
const NICE_LADDER: [(f64, u32); 5] = [(1.0, 5), (2.0, 4), (2.5, 5), (5.0, 5), (10.0, 5)];

/// Smallest ladder value ≥ `value` and its gridline count; 0, negative or non-finite give 1.
fn nice_scale(value: f64) -> (f64, u32) {
    if !(value.is_finite() && value > 0.0) {
        return (1.0, 5);
    }
    // Bounded so the decade below neither underflows to 0 nor the top rung overflows to inf.
    let value = value.clamp(1e-6, 1e300);
    let decade = 10f64.powi(value.log10().floor() as i32);
    for (mantissa, divisions) in NICE_LADDER {
        // Tolerance: a value that is itself a ladder rung must map to itself despite rounding.
        if mantissa * decade >= value * (1.0 - 1e-9) {
            return (mantissa * decade, divisions);
        }
    }
    (10.0 * decade, 5)
}

fn nice_max(value: f64) -> f64 {
    nice_scale(value).0
}

/// Compact fixed-point label: 12.5k, 1.2M, 0.05; three significant digits at most.
fn fmt_compact(value: f64) -> String {
    let value = sanitize(value);
    let (scaled, suffix) = match value {
        v if v >= 1e9 => (v / 1e9, "G"),
        v if v >= 1e6 => (v / 1e6, "M"),
        v if v >= 1e3 => (v / 1e3, "k"),
        v => (v, ""),
    };
    if scaled == 0.0 {
        return "0".to_string();
    }
    let decimals = (2 - scaled.log10().floor() as i32).clamp(0, 9) as usize;
    let mut digits = format!("{scaled:.decimals$}");
    if digits.contains('.') {
        digits = digits.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    digits + suffix
}

fn xml_escape(text: &str) -> String {
    // '&' first, so the entities added after it are not escaped twice.
    let escaped = text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    escaped.replace('"', "&quot;").replace('\'', "&apos;")
}

fn text(svg: &mut String, x: f64, y: f64, anchor: &str, size: u32, content: &str) {
    let _ = write!(
        svg,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" font-family="sans-serif" font-size="{size}">{}</text>"#,
        xml_escape(content)
    );
}

fn line(svg: &mut String, (x1, y1): (f64, f64), (x2, y2): (f64, f64), colour: &str, dashed: bool) {
    let dash = if dashed { r#" stroke-dasharray="6 4""# } else { "" };
    let _ = write!(svg, r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{colour}"{dash}/>"#);
}

fn polyline(svg: &mut String, points: &[(f64, f64)], colour: &str, dashed: bool) {
    let mut coords = String::new();
    for (x, y) in points {
        let _ = write!(coords, "{x:.1},{y:.1} ");
    }
    // A lone sample becomes a zero-length segment, which round caps render as a dot.
    if let [(x, y)] = points {
        let _ = write!(coords, "{x:.1},{y:.1}");
    }
    let dash = if dashed { r#" stroke-dasharray="6 4""# } else { "" };
    let _ = write!(
        svg,
        r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1.5" stroke-linecap="round" stroke-linejoin="round"{dash}/>"#,
        coords.trim_end()
    );
}

/// Frame plus horizontal gridlines labelled on the left from 0 to `max`.
fn panel_frame(svg: &mut String, panel: Panel, (max, divisions): (f64, u32)) {
    for i in 0..=divisions {
        let value = max * f64::from(i) / f64::from(divisions);
        let y = panel.y(value, max);
        line(svg, (PLOT_LEFT, y), (PLOT_RIGHT, y), "#e0e0e0", false);
        text(svg, PLOT_LEFT - 6.0, y + 4.0, "end", 11, &fmt_compact(value));
    }
    let (top, height, width) = (panel.top, panel.bottom - panel.top, PLOT_RIGHT - PLOT_LEFT);
    let _ = write!(
        svg,
        r##"<rect x="{PLOT_LEFT}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#888"/>"##
    );
}

/// Tick marks and labels on the right edge, for a second series with its own scale.
fn right_axis(svg: &mut String, panel: Panel, (max, divisions): (f64, u32), unit: &str) {
    for i in 0..=divisions {
        let value = max * f64::from(i) / f64::from(divisions);
        let y = panel.y(value, max);
        line(svg, (PLOT_RIGHT, y), (PLOT_RIGHT + 4.0, y), RSS_COLOUR, false);
        text(svg, PLOT_RIGHT + 7.0, y + 4.0, "start", 11, &fmt_compact(value));
    }
    text(svg, PLOT_RIGHT + 7.0, panel.top - 10.0, "start", 11, unit);
}

/// Legend entries above a panel: (label, colour, dashed).
fn legend(svg: &mut String, panel: Panel, entries: &[(&str, &str, bool)]) {
    let (mut x, y) = (PLOT_LEFT, panel.top - 10.0);
    for &(label, colour, dashed) in entries {
        line(svg, (x, y - 4.0), (x + 20.0, y - 4.0), colour, dashed);
        text(svg, x + 26.0, y, "start", 12, label);
        x += 46.0 + 7.0 * label.chars().count() as f64;
    }
}

/// Vertical gridlines through both panels and second labels under the lower one.
fn time_axis(svg: &mut String, t_max: f64) {
    let step = nice_max(t_max / 6.0);
    // step ≥ t_max / 6 bounds this to 6; the min() guards against clamping in nice_scale.
    let tick_count = ((t_max / step).floor() as u32).min(10);
    for i in 0..=tick_count {
        let t = step * f64::from(i);
        let x = x_pixel(t, t_max);
        for panel in [THROUGHPUT, LATENCY] {
            line(svg, (x, panel.top), (x, panel.bottom), "#f0f0f0", false);
        }
        text(svg, x, LATENCY.bottom + 16.0, "middle", 11, &fmt_compact(t));
    }
    text(svg, (PLOT_LEFT + PLOT_RIGHT) / 2.0, LATENCY.bottom + 40.0, "middle", 12, "seconds");
}

/// Pixel points of one series, reading `value` from each tick.
fn project<'a>(
    ticks: impl Iterator<Item = &'a Tick>, t_max: f64, panel: Panel, max: f64, value: fn(&Tick) -> f64,
) -> Vec<(f64, f64)> {
    ticks.map(|t| (x_pixel(t.t_s, t_max), panel.y(value(t), max))).collect()
}

/// A run's parameters in words for a title: `dashboards 1000, tenants 10, rate 200, …` (the
/// scalar ones, by name, names with spaces).
pub fn in_words(parameters: &serde_json::Value) -> String {
    let Some(object) = parameters.as_object() else { return parameters.to_string() };
    object
        .iter()
        .filter_map(|(name, value)| {
            let value = match value {
                serde_json::Value::Number(n) => n.as_f64().map(|f| if f.fract() == 0.0 { format!("{f:.0}") } else { format!("{f:.1}") })?,
                serde_json::Value::Bool(b) => b.to_string(),
                serde_json::Value::String(s) => s.clone(),
                _ => return None,
            };
            Some(format!("{} {value}", name.replace('_', " ")))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Complete standalone SVG document plotting `ticks` under `title`.
pub fn timeline_svg(title: &str, ticks: &[Tick]) -> String {
    let mut svg = String::with_capacity(8192 + 64 * ticks.len());
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}">"#
    );
    svg.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
    text(&mut svg, WIDTH / 2.0, 26.0, "middle", 16, title);

    // At least one second wide, so a lone tick at t=0 still has an axis to sit on.
    let t_max = peak(ticks.iter().map(|t| t.t_s)).max(1.0);
    let throughput_scale =
        nice_scale(peak(ticks.iter().flat_map(|t| [t.changes_merged_per_s, t.deltas_per_s])));
    let latency_scale = nice_scale(peak(ticks.iter().map(|t| t.ack_p99_ms)));
    // RSS 0 means the hub pid was unknown, not an empty hub: those seconds are left out.
    let rss_known = || ticks.iter().filter(|t| t.hub_rss_kib > 0);
    let rss_mib: fn(&Tick) -> f64 = |t| t.hub_rss_kib as f64 / 1024.0;
    let has_rss = rss_known().next().is_some();
    let rss_scale = nice_scale(peak(rss_known().map(rss_mib)));

    time_axis(&mut svg, t_max);
    panel_frame(&mut svg, THROUGHPUT, throughput_scale);
    panel_frame(&mut svg, LATENCY, latency_scale);
    if has_rss {
        right_axis(&mut svg, LATENCY, rss_scale, "MiB");
    }
    if ticks.is_empty() {
        for panel in [THROUGHPUT, LATENCY] {
            let middle_y = (panel.top + panel.bottom) / 2.0;
            text(&mut svg, (PLOT_LEFT + PLOT_RIGHT) / 2.0, middle_y, "middle", 14, "no samples");
        }
    } else {
        let merged = project(ticks.iter(), t_max, THROUGHPUT, throughput_scale.0, |t| t.changes_merged_per_s);
        polyline(&mut svg, &merged, MERGED_COLOUR, false);
        let deltas = project(ticks.iter(), t_max, THROUGHPUT, throughput_scale.0, |t| t.deltas_per_s);
        polyline(&mut svg, &deltas, DELTAS_COLOUR, false);
        let latency = project(ticks.iter(), t_max, LATENCY, latency_scale.0, |t| t.ack_p99_ms);
        polyline(&mut svg, &latency, LATENCY_COLOUR, false);
        if has_rss {
            polyline(&mut svg, &project(rss_known(), t_max, LATENCY, rss_scale.0, rss_mib), RSS_COLOUR, true);
        }
    }

    let throughput_legend =
        [("changes merged/s", MERGED_COLOUR, false), ("deltas delivered/s", DELTAS_COLOUR, false)];
    legend(&mut svg, THROUGHPUT, &throughput_legend);
    let mut latency_legend = vec![("ack p99 (ms)", LATENCY_COLOUR, false)];
    if has_rss {
        latency_legend.push(("hub RSS (MiB)", RSS_COLOUR, true));
    }
    legend(&mut svg, LATENCY, &latency_legend);
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(t_s: f64, merged: f64, deltas: f64, p99: f64, rss_kib: u64) -> Tick {
        Tick {
            t_s,
            changes_merged_per_s: merged,
            deltas_per_s: deltas,
            ack_p99_ms: p99,
            delivery_p99_ms: 0.0,
            hub_rss_kib: rss_kib,
            hub_cpu_pct: 0.0,
            steal_pct: 0.0,
        }
    }

    /// Asserts the XML-ish shape and returns how many polylines were drawn.
    fn assert_well_formed(svg: &str) -> usize {
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""), "{svg}");
        assert!(svg.ends_with("</svg>"), "{svg}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "non-finite number in {svg}");
        // Text is escaped, so every '<' opens a tag that some '>' closes.
        assert_eq!(svg.matches('<').count(), svg.matches('>').count());
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert_eq!(svg.matches("<svg").count(), 1);
        svg.matches("<polyline").count()
    }

    #[test]
    fn nice_ladder_is_1_2_2p5_5() {
        let cases = [(1.0, 1.0), (7.0, 10.0), (12.0, 20.0), (22.0, 25.0), (30.0, 50.0), (0.0, 1.0),
            (0.3, 0.5), (1000.0, 1000.0), (2500.0, 2500.0), (-5.0, 1.0), (f64::NAN, 1.0), (f64::INFINITY, 1.0)];
        for (input, expected) in cases {
            assert!((nice_max(input) - expected).abs() < 1e-9 * expected, "{input} -> {}", nice_max(input));
        }
        assert_eq!(nice_scale(200.0).1, 4, "2 × 10^k splits into 0.5 steps");
        assert_eq!(nice_scale(250.0).1, 5);
    }

    #[test]
    fn compact_labels() {
        let cases = [(0.0, "0"), (2.5, "2.5"), (100.0, "100"), (0.05, "0.05"), (12_500.0, "12.5k"),
            (1_200_000.0, "1.2M"), (20_000.0, "20k"), (f64::NAN, "0")];
        for (input, expected) in cases {
            assert_eq!(fmt_compact(input), expected);
        }
    }

    #[test]
    fn known_values_land_on_expected_pixels() {
        // Peak 1000 is its own nice max, so it must touch the throughput panel's top edge,
        // and t=10 is the time axis maximum, so the right edge.
        let ticks = [tick(0.0, 0.0, 0.0, 4.0, 0), tick(5.0, 500.0, 0.0, 2.0, 0), tick(10.0, 1000.0, 0.0, 5.0, 0)];
        let svg = timeline_svg("run", &ticks);
        assert_eq!(assert_well_formed(&svg), 3);
        assert!(svg.contains(r#"points="70.0,260.0 450.0,160.0 830.0,60.0""#), "{svg}");
        // Latency peak 5 ms is also a ladder value: top of the latency panel; 2 ms is 40% up.
        assert!(svg.contains(r#"points="70.0,346.0 450.0,418.0 830.0,310.0""#), "{svg}");
    }

    #[test]
    fn parameters_read_as_words() {
        let words = in_words(&serde_json::json!({"dashboards": 1000, "rate": 200.0, "supabase_vsn": "1.0.0", "p99_ms": 1.25, "tags": ["x"]}));
        assert_eq!(words, "dashboards 1000, p99 ms 1.2, rate 200, supabase vsn 1.0.0");
    }

    #[test]
    fn title_is_escaped() {
        let svg = timeline_svg(r#"<storm> & "fanout""#, &[tick(0.0, 1.0, 1.0, 1.0, 0)]);
        assert_well_formed(&svg);
        assert!(svg.contains("&lt;storm&gt; &amp; &quot;fanout&quot;"), "{svg}");
        assert!(!svg.contains("<storm>"));
    }

    #[test]
    fn empty_timeline_renders_axes_and_note() {
        let svg = timeline_svg("empty", &[]);
        assert_eq!(assert_well_formed(&svg), 0);
        assert!(svg.contains("no samples") && svg.contains("seconds"));
    }

    #[test]
    fn single_tick_draws_every_series_as_a_dot() {
        let svg = timeline_svg("one", &[tick(0.0, 10.0, 20.0, 3.0, 0)]);
        assert_eq!(assert_well_formed(&svg), 3);
        // Nice max 20: merged 10 sits half-way up, deltas 20 at the top, both at the left edge.
        assert!(svg.contains(r#"points="70.0,160.0 70.0,160.0""#), "{svg}");
        assert!(svg.contains(r#"points="70.0,60.0 70.0,60.0""#), "{svg}");
        assert!(!svg.contains("no samples"));
    }

    #[test]
    fn zero_and_non_finite_inputs_stay_finite() {
        let zeros = [tick(0.0, 0.0, 0.0, 0.0, 0), tick(1.0, 0.0, 0.0, 0.0, 0)];
        assert_eq!(assert_well_formed(&timeline_svg("zeros", &zeros)), 3);
        let bad = [tick(f64::NAN, f64::INFINITY, f64::NEG_INFINITY, f64::NAN, 0), tick(2.0, -1.0, 5.0, 1e308, 0)];
        assert_eq!(assert_well_formed(&timeline_svg("bad", &bad)), 3);
    }

    #[test]
    fn rss_line_only_when_rss_known() {
        let without = timeline_svg("no rss", &[tick(0.0, 1.0, 1.0, 1.0, 0), tick(1.0, 1.0, 1.0, 1.0, 0)]);
        assert_eq!(assert_well_formed(&without), 3);
        assert!(!without.contains("hub RSS") && !without.contains("stroke-dasharray"));
        // 0 KiB means the pid was unknown for that second: left out of the line.
        let with = timeline_svg("rss", &[tick(0.0, 1.0, 1.0, 1.0, 0), tick(1.0, 1.0, 1.0, 1.0, 500 * 1024)]);
        assert_eq!(assert_well_formed(&with), 4);
        assert!(with.contains("hub RSS (MiB)"));
        // 500 MiB is a ladder value, so its one point sits at the panel's top right.
        assert!(with.contains(r##"points="830.0,310.0 830.0,310.0" fill="none" stroke="#2ca02c""##), "{with}");
    }
}
