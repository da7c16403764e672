//! Charts drawn on the server as inline SVG, so the dashboard needs no script library and works
//! offline: a scatter of variants (bits per weight against an error measure) and a bar chart of
//! per-tensor errors. Pure functions of their data, unit-tested below.

use std::fmt::Write;

use super::page::escape;

/// One variant on a trade-off chart.
pub struct Point<'a> {
    /// What the point is (its `data-variant` and tooltip).
    pub id: &'a str,
    /// Short text beside the point (the type or method).
    pub label: &'a str,
    pub x: f64,
    pub y: f64,
}

/// The vertical axis of a scatter: linear, or log10 for measures spanning decades (KLD).
#[derive(Clone, Copy, PartialEq)]
pub enum Scale {
    Linear,
    Log,
}

const W: f64 = 440.0;
const H: f64 = 290.0;
const LEFT: f64 = 62.0;
const RIGHT: f64 = 18.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 44.0;

/// Maps data to pixels along one axis.
struct Axis {
    lo: f64,
    hi: f64,
    px_lo: f64,
    px_hi: f64,
    log: bool,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, px_lo: f64, px_hi: f64, log: bool) -> Self {
        let t = |v: f64| if log { v.log10() } else { v };
        let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(t(v)), hi.max(t(v)))
        });
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        // A margin so no point sits on the frame, and a span even for one point.
        let pad = ((hi - lo) * 0.08).max(if log { 0.15 } else { 0.05 * hi.abs().max(1.0) });
        Self {
            lo: lo - pad,
            hi: hi + pad,
            px_lo,
            px_hi,
            log,
        }
    }

    fn px(&self, v: f64) -> f64 {
        let v = if self.log { v.log10() } else { v };
        self.px_lo + (v - self.lo) / (self.hi - self.lo) * (self.px_hi - self.px_lo)
    }

    /// Tick values in data units: powers of ten on a log axis, 1-2-5 steps on a linear one.
    fn ticks(&self) -> Vec<f64> {
        if self.log {
            return (self.lo.ceil() as i32..=self.hi.floor() as i32)
                .map(|e| 10f64.powi(e))
                .collect();
        }
        let raw = (self.hi - self.lo) / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(10.0 * mag);
        let mut v = (self.lo / step).ceil() * step;
        let mut out = Vec::new();
        while v <= self.hi + 1e-12 {
            out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
            v += step;
        }
        out
    }
}

fn tick_text(v: f64) -> String {
    if v != 0.0 && (v.abs() < 0.01 || v.abs() >= 10_000.0) {
        format!("{v:.0e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

/// The start of a chart `width` pixels wide: the svg element, its title, and the plot frame.
fn open(class: &str, width: f64, title: &str) -> String {
    format!(
        r#"<svg class="chart {class}" viewBox="0 0 {width} {H}" width="{width}" height="{H}" role="img" aria-label="{t}"><title>{t}</title><text class="chart-title" x="{}" y="18" text-anchor="middle">{t}</text><rect class="frame" x="{LEFT}" y="{TOP}" width="{}" height="{}"/>"#,
        width / 2.0,
        width - LEFT - RIGHT,
        H - TOP - BOTTOM,
        t = escape(title)
    )
}

/// The vertical axis of a chart `width` pixels wide: a grid line and value per tick, and the
/// axis label turned upright along the left edge.
fn y_axis(s: &mut String, ya: &Axis, width: f64, label: &str) {
    for v in ya.ticks() {
        let y = ya.px(v);
        let _ = write!(
            s,
            r#"<line class="grid" x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}"/><text class="tick" x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            width - RIGHT,
            LEFT - 5.0,
            y + 4.0,
            tick_text(v)
        );
    }
    let _ = write!(
        s,
        r#"<text class="axis" transform="translate(14 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (TOP + H - BOTTOM) / 2.0,
        escape(label)
    );
}

/// The horizontal axis' label, centred under the plot of a chart `width` pixels wide.
fn x_axis_label(s: &mut String, width: f64, label: &str) {
    let _ = write!(
        s,
        r#"<text class="axis" x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (LEFT + width - RIGHT) / 2.0,
        H - 8.0,
        escape(label)
    );
}

/// A scatter of `points` with labelled axes; points whose value cannot be drawn (not finite,
/// or ≤ 0 on a log axis) are left out, and the caller says so beside the chart.
pub fn scatter(
    title: &str,
    x_label: &str,
    y_label: &str,
    scale: Scale,
    points: &[Point],
) -> String {
    let drawable: Vec<&Point> = points
        .iter()
        .filter(|p| p.x.is_finite() && p.y.is_finite() && (scale == Scale::Linear || p.y > 0.0))
        .collect();
    let xa = Axis::new(drawable.iter().map(|p| p.x), LEFT, W - RIGHT, false);
    let ya = Axis::new(
        drawable.iter().map(|p| p.y),
        H - BOTTOM,
        TOP,
        scale == Scale::Log,
    );
    let mut s = open("scatter", W, title);
    for v in xa.ticks() {
        let x = xa.px(v);
        let _ = write!(
            s,
            r#"<line class="grid" x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}"/><text class="tick" x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
            H - BOTTOM,
            H - BOTTOM + 14.0,
            tick_text(v)
        );
    }
    y_axis(&mut s, &ya, W, y_label);
    if scale == Scale::Linear && ya.lo < 0.0 && ya.hi > 0.0 {
        let y = ya.px(0.0);
        let _ = write!(
            s,
            r#"<line class="zero" x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}"/>"#,
            W - RIGHT
        );
    }
    x_axis_label(&mut s, W, x_label);
    for p in &drawable {
        let (x, y) = (xa.px(p.x), ya.px(p.y));
        let _ = write!(
            s,
            r#"<circle class="point" data-variant="{id}" cx="{x:.1}" cy="{y:.1}" r="5"><title>{id}: {bx:.2} bits/weight, {yl} {yv}</title></circle><text class="point-label" x="{:.1}" y="{:.1}">{}</text>"#,
            x + 7.0,
            y - 6.0,
            escape(p.label),
            id = escape(p.id),
            bx = p.x,
            yl = escape(y_label),
            yv = tick_text(p.y),
        );
    }
    s.push_str("</svg>");
    s
}

/// One tensor's error for the bar chart.
pub struct Bar<'a> {
    pub name: &'a str,
    /// The tensor's quantized type, which picks its colour.
    pub group: &'a str,
    pub value: f64,
}

/// Bars in the given order (the model's tensor order), one per tensor, coloured by type, with
/// a legend; hovering a bar names its tensor.
pub fn bars(title: &str, y_label: &str, items: &[Bar]) -> String {
    const BW: f64 = 900.0;
    let width = BW - LEFT - RIGHT;
    let ya = Axis::new(
        items
            .iter()
            .map(|b| b.value)
            .filter(|v| v.is_finite())
            .chain(std::iter::once(0.0)),
        H - BOTTOM,
        TOP,
        false,
    );
    let ya = Axis { lo: 0.0, ..ya };
    let mut groups: Vec<&str> = Vec::new();
    for b in items {
        if !groups.contains(&b.group) {
            groups.push(b.group);
        }
    }
    let mut s = open("bars", BW, title);
    y_axis(&mut s, &ya, BW, y_label);
    x_axis_label(
        &mut s,
        BW,
        &format!("tensors in model order ({})", items.len()),
    );
    let step = width / items.len().max(1) as f64;
    for (i, b) in items.iter().enumerate() {
        let v = if b.value.is_finite() { b.value } else { 0.0 };
        let y = ya.px(v);
        let g = groups.iter().position(|g| *g == b.group).unwrap_or(0);
        let _ = write!(
            s,
            r#"<rect class="bar c{}" data-tensor="{n}" x="{:.2}" y="{y:.1}" width="{:.2}" height="{:.1}"><title>{n} ({}): {}</title></rect>"#,
            g % 8,
            LEFT + i as f64 * step,
            (step * 0.85).max(0.5),
            (H - BOTTOM - y).max(0.0),
            escape(b.group),
            tick_text(b.value),
            n = escape(b.name),
        );
    }
    for (g, name) in groups.iter().enumerate() {
        let x = LEFT + 8.0 + g as f64 * 110.0;
        let _ = write!(
            s,
            r#"<rect class="bar c{}" x="{x}" y="{}" width="10" height="10"/><text class="tick" x="{}" y="{}">{}</text>"#,
            g % 8,
            TOP + 6.0,
            x + 14.0,
            TOP + 15.0,
            escape(name)
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt<'a>(id: &'a str, label: &'a str, x: f64, y: f64) -> Point<'a> {
        Point { id, label, x, y }
    }

    fn bar<'a>(name: &'a str, group: &'a str, value: f64) -> Bar<'a> {
        Bar { name, group, value }
    }

    fn circles(svg: &str) -> usize {
        svg.matches("<circle class=\"point\"").count()
    }

    #[test]
    fn scatter_draws_one_point_per_drawable_variant_and_skips_the_rest() {
        let pts = [
            pt("m:q8", "Q8_0", 8.5, 0.001),
            pt("m:q4", "Q4_K_M", 4.9, 0.05),
            pt("m:q2", "Q2_K", 2.9, 0.6),
            pt("m:bad", "x", 4.0, 0.0),
        ];
        let log = scatter("KLD", "bits per weight", "KLD", Scale::Log, &pts);
        assert_eq!(circles(&log), 3, "y = 0 cannot sit on a log axis");
        let lin = scatter("Δppl", "bits per weight", "Δppl %", Scale::Linear, &pts);
        assert_eq!(circles(&lin), 4);
        assert!(log.contains(r#"data-variant="m:q4""#));
    }

    #[test]
    fn fewer_bits_sit_left_and_more_error_sits_higher() {
        let pts = [pt("a", "a", 8.0, 0.001), pt("b", "b", 3.0, 0.5)];
        let svg = scatter("t", "x", "y", Scale::Log, &pts);
        let pos = |id: &str| {
            let at = svg.find(&format!(r#"data-variant="{id}""#)).unwrap();
            let rest = &svg[at..];
            let num = |key: &str| -> f64 {
                let i = rest.find(key).unwrap() + key.len();
                rest[i..].split('"').next().unwrap().parse().unwrap()
            };
            (num("cx=\""), num("cy=\""))
        };
        let (a, b) = (pos("a"), pos("b"));
        assert!(b.0 < a.0, "3 bits left of 8 bits");
        assert!(b.1 < a.1, "larger KLD drawn higher (smaller y)");
        for (x, y) in [a, b] {
            assert!((LEFT..=W - RIGHT).contains(&x) && (TOP..=H - BOTTOM).contains(&y));
        }
    }

    #[test]
    fn labels_are_escaped() {
        let pts = [pt("<m>", "a&b", 1.0, 1.0)];
        let svg = scatter("t<", "x", "y", Scale::Linear, &pts);
        assert!(!svg.contains("<m>") && svg.contains("&lt;m&gt;") && svg.contains("a&amp;b"));
    }

    #[test]
    fn ticks_are_round_numbers_inside_the_axis() {
        let a = Axis::new([0.3, 7.7].into_iter(), 0.0, 100.0, false);
        let t = a.ticks();
        assert!(t.len() >= 3 && t.iter().all(|v| (*v >= a.lo) && (*v <= a.hi)));
        assert!(t
            .iter()
            .all(|v| (v * 1e6).round() % 5e5 == 0.0 || v.fract() == 0.0));
        let l = Axis::new([0.001, 0.5].into_iter(), 0.0, 100.0, true);
        assert_eq!(l.ticks(), vec![0.001, 0.01, 0.1]);
    }

    #[test]
    fn bars_draw_one_bar_per_tensor_with_a_legend_per_type() {
        let items = [
            bar("blk.0.attn_q.weight", "Q4_K", 0.05),
            bar("blk.0.ffn_down.weight", "Q6_K", 0.02),
            bar("blk.1.attn_q.weight", "Q4_K", 0.06),
        ];
        let svg = bars("error", "rel. RMSE", &items);
        assert_eq!(svg.matches("data-tensor=").count(), 3);
        assert_eq!(
            svg.matches("class=\"bar c0\"").count(),
            3,
            "two Q4_K bars + legend"
        );
        assert_eq!(svg.matches("class=\"bar c1\"").count(), 2);
    }
}
