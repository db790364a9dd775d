//! The pieces both bench charts are drawn with (hand-written SVG: a few rectangles and lines
//! need no plotting crate): the document with its white background and titles, the value axis,
//! and escaping.

use std::fmt::Write as _;

/// Starts a `width` x `height` document with a white background, a bold `title` and a grey
/// `subtitle` beginning at `left`.
pub fn open(width: f64, height: f64, left: f64, title: &str, subtitle: &str) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"##
    );
    svg.push_str("<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n");
    let _ = writeln!(
        svg,
        r##"<text x="{left}" y="20" font-size="14" font-weight="bold">{}</text>"##,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r##"<text x="{left}" y="38" fill="#555">{}</text>"##,
        escape(subtitle)
    );
    svg
}

/// A horizontal value axis at `y` from `left` over `width`, five ticks from 0 to `max`, and a
/// grey `note` below it (a line per line of it); closes the document.
pub fn axis_and_close(svg: &mut String, left: f64, width: f64, y: f64, max: f64, note: &str) {
    let x = |v: f64| left + width * v / max;
    let _ = writeln!(
        svg,
        r##"<path d="M{left} {y:.1}H{:.1}" stroke="#222"/>"##,
        left + width
    );
    for k in 0..=4 {
        let v = max * f64::from(k) / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">{v:.0}</text>"##,
            x(v),
            y + 16.0
        );
    }
    for (i, line) in note.lines().enumerate() {
        let _ = writeln!(
            svg,
            r##"<text x="{left}" y="{:.1}" fill="#555">{}</text>"##,
            y + 34.0 + 16.0 * i as f64,
            escape(line)
        );
    }
    svg.push_str("</svg>\n");
}

/// Text for an SVG element or attribute.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
