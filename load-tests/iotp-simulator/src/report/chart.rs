//! Line charts as SVG: no dependencies, they open in any browser and render on GitHub.

use std::fmt::Write as _;

/// One line of a chart: name, colour, points.
pub type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// A line chart as SVG: no dependencies, opens in any browser and renders on GitHub.
/// `markers`: vertical dashed lines at these x values, each labelled (the chaos faults).
pub fn svg_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    markers: &[(f64, String)],
) -> String {
    let (w, h, left, right, top, bottom) = (900.0, 360.0, 70.0, 20.0, 40.0, 50.0);
    let points = series.iter().flat_map(|s| s.2.iter());
    let x_max = points
        .clone()
        .map(|p| p.0)
        .chain(markers.iter().map(|m| m.0))
        .fold(1.0_f64, f64::max);
    let y_max = points.map(|p| p.1).fold(1.0_f64, f64::max) * 1.1;
    let x = |v: f64| left + v / x_max * (w - left - right);
    let y = |v: f64| h - bottom - v / y_max * (h - top - bottom);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        w / 2.0,
        escape(title)
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>",
            w - right,
            left - 6.0,
            y(v) + 4.0,
            y = y(v)
        );
        let xv = x_max * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{xv:.0}</text>",
            x(xv),
            h - bottom + 18.0
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">{}</text>",
        w / 2.0,
        h - 10.0,
        escape(x_label),
        h / 2.0,
        h / 2.0,
        escape(y_label)
    );
    for (n, (name, color, data)) in series.iter().enumerate() {
        let path: Vec<String> = data
            .iter()
            .map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>",
            path.join(" "),
            w - right - 60.0,
            top + 14.0 + 16.0 * n as f64,
            escape(name)
        );
    }
    for (at, label) in markers {
        let _ = writeln!(
            svg,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{top}\" y2=\"{}\" stroke=\"#888\" stroke-dasharray=\"4 3\"/><text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\" fill=\"#555\">{}</text>",
            h - bottom,
            top - 3.0,
            escape(label),
            x = x(*at)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_one_polyline_per_series_and_escapes_text() {
        let svg = svg_chart(
            "a < b",
            "x",
            "y",
            &[
                ("one", "#000", vec![(0.0, 1.0), (1.0, 2.0)]),
                ("two", "#f00", vec![(0.0, 3.0)]),
            ],
            &[(0.5, "1".into()), (0.7, "<2>".into())],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(
            svg.matches("stroke-dasharray").count(),
            2,
            "one line per marker"
        );
        assert!(svg.contains("&lt;2&gt;"));
        assert!(svg.contains("a &lt; b"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
