//! Small inline SVG line charts for the status page: no scripts, no external assets (the
//! page's CSP forbids both), readable without a legend lookup: the y axis says its unit
//! and scale, the x axis the time span, and a gap in a line means no data there.

use std::fmt::Write as _;

use super::page::esc;

/// One line: a value per bucket, oldest first; `None` is a gap.
pub struct Series<'a> {
    /// Shown in the legend and as the line's tooltip; also its `data-series`.
    pub label: String,
    pub color: &'a str,
    pub dashed: bool,
    pub points: Vec<Option<f64>>,
}

/// How values are written on the y axis.
#[derive(Clone, Copy)]
pub enum Unit {
    PerSecond,
    /// A share in 0..=1, written as a percentage.
    Share,
    Milliseconds,
}

impl Unit {
    fn format(self, value: f64) -> String {
        match self {
            Unit::PerSecond => format!("{}/s", number(value)),
            Unit::Share => format!("{}%", number(value * 100.0)),
            Unit::Milliseconds => format!("{} ms", number(value)),
        }
    }
}

/// A compact number: no needless decimals.
fn number(value: f64) -> String {
    if value == 0.0 {
        "0".into()
    } else if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        trim(format!("{value:.1}"))
    } else {
        trim(format!("{value:.2}"))
    }
}

fn trim(text: String) -> String {
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

const WIDTH: f64 = 340.0;
const HEIGHT: f64 = 130.0;
const LEFT: f64 = 52.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 8.0;
const BOTTOM: f64 = 20.0;

/// The smallest "round" number (1, 2, 2.5, 5 × 10^n) at or above `value`.
fn nice_ceiling(value: f64) -> f64 {
    if !value.is_finite() || value <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if step * magnitude >= value * 0.999_999 {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

/// One chart as an `<svg>` element. `id` names it (`data-chart`); `span_minutes` is
/// how far back the first point lies. Values that are not finite count as gaps.
pub fn line_chart(
    id: &str,
    title: &str,
    unit: Unit,
    span_minutes: u32,
    series: &[Series],
) -> String {
    let clean = |v: &Option<f64>| v.filter(|v| v.is_finite() && *v >= 0.0);
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().filter_map(clean))
        .fold(0.0f64, f64::max);
    let has_data = series
        .iter()
        .any(|s| s.points.iter().any(|p| clean(p).is_some()));
    let top = if unit_is_share(unit) && max > 0.5 {
        1.0
    } else {
        nice_ceiling(max)
    };
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let mut svg = String::with_capacity(2048);
    let _ = write!(
        svg,
        "<svg class=\"chart\" data-chart=\"{id}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" role=\"img\" \
         aria-label=\"{title}\"><title>{title}</title>",
        id = esc(id),
        title = esc(title),
    );
    // Grid lines and y labels at 0, half and the top.
    for step in 0..=2 {
        let value = top * f64::from(step) / 2.0;
        let y = TOP + plot_h - plot_h * f64::from(step) / 2.0;
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{x2:.1}\" y2=\"{y:.1}\" stroke=\"#e3e7eb\"/>\
             <text x=\"{lx:.1}\" y=\"{ty:.1}\" text-anchor=\"end\" font-size=\"10\" fill=\"#5a6570\">{label}</text>",
            x2 = LEFT + plot_w,
            lx = LEFT - 4.0,
            ty = y + 3.5,
            label = esc(&unit.format(value)),
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{LEFT}\" y=\"{y:.1}\" font-size=\"10\" fill=\"#5a6570\">{span_minutes} min ago</text>\
         <text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"end\" font-size=\"10\" fill=\"#5a6570\">now</text>",
        y = HEIGHT - 5.0,
        x = LEFT + plot_w,
    );
    if !has_data {
        let _ = write!(
            svg,
            "<text class=\"empty\" x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"middle\" font-size=\"12\" fill=\"#7f8c8d\">no requests yet</text>",
            x = LEFT + plot_w / 2.0,
            y = TOP + plot_h / 2.0,
        );
    }
    for s in series {
        let n = s.points.len();
        let x_of = |i: usize| {
            if n <= 1 {
                LEFT + plot_w
            } else {
                LEFT + plot_w * i as f64 / (n - 1) as f64
            }
        };
        let y_of = |v: f64| TOP + plot_h - plot_h * (v / top).min(1.0);
        let dash = if s.dashed {
            " stroke-dasharray=\"4 3\""
        } else {
            ""
        };
        let _ = write!(
            svg,
            "<g data-series=\"{label}\"><title>{label}</title>",
            label = esc(&s.label)
        );
        // Runs of consecutive points become polylines; a lone point a dot.
        let mut run: Vec<(f64, f64)> = Vec::new();
        let flush = |run: &mut Vec<(f64, f64)>, svg: &mut String| {
            match run.len() {
                0 => {}
                1 => {
                    let _ = write!(
                        svg,
                        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"{}\"/>",
                        run[0].0,
                        run[0].1,
                        esc(s.color)
                    );
                }
                _ => {
                    let points: Vec<String> =
                        run.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                    let _ = write!(
                        svg,
                        "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.6\"{dash}/>",
                        points.join(" "),
                        esc(s.color)
                    );
                }
            }
            run.clear();
        };
        for (i, point) in s.points.iter().enumerate() {
            match clean(point) {
                Some(v) => run.push((x_of(i), y_of(v))),
                None => flush(&mut run, &mut svg),
            }
        }
        flush(&mut run, &mut svg);
        svg.push_str("</g>");
    }
    svg.push_str("</svg>");
    svg
}

fn unit_is_share(unit: Unit) -> bool {
    matches!(unit, Unit::Share)
}

/// The legend under a chart: a swatch (solid or dashed) and the label per series.
pub fn legend(series: &[Series]) -> String {
    let mut html = String::from("<div class=\"legend\">");
    for s in series {
        let style = if s.dashed { "dashed" } else { "solid" };
        let _ = write!(
            html,
            "<span><i style=\"border-top:2px {style} {}\"></i>{}</span>",
            esc(s.color),
            esc(&s.label)
        );
    }
    html.push_str("</div>");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(points: Vec<Option<f64>>) -> Series<'static> {
        Series {
            label: "privatelink".into(),
            color: "#2563eb",
            dashed: false,
            points,
        }
    }

    #[test]
    fn empty_data_draws_a_frame_and_says_so() {
        for data in [vec![], vec![None; 90]] {
            let svg = line_chart("rps", "requests/s", Unit::PerSecond, 15, &[series(data)]);
            assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
            assert!(svg.contains("no requests yet"));
            assert!(!svg.contains("<polyline") && !svg.contains("<circle"));
            assert!(!svg.contains("NaN") && !svg.contains("inf"));
        }
        let svg = line_chart("none", "nothing", Unit::Milliseconds, 15, &[]);
        assert!(svg.contains("no requests yet"));
    }

    #[test]
    fn gaps_split_lines_and_lone_points_are_dots() {
        let points = vec![
            Some(1.0),
            Some(2.0),
            None,
            Some(4.0),
            None,
            Some(3.0),
            Some(0.0),
        ];
        let svg = line_chart("rps", "requests/s", Unit::PerSecond, 15, &[series(points)]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(!svg.contains("no requests yet"));
        // The y axis tops at a round number at or above the largest value.
        assert!(svg.contains(">5/s<"), "{svg}");
    }

    #[test]
    fn labels_and_titles_are_escaped_and_bad_values_dropped() {
        let s = Series {
            label: "<script>alert(1)</script>".into(),
            color: "\"><script>",
            dashed: true,
            points: vec![Some(f64::NAN), Some(f64::INFINITY), Some(-1.0), Some(0.25)],
        };
        let svg = line_chart("x\"y", "a & <b>", Unit::Share, 15, std::slice::from_ref(&s));
        assert!(!svg.contains("<script>"));
        assert!(svg.contains("&lt;script&gt;"));
        assert!(svg.contains("a &amp; &lt;b&gt;"));
        assert!(svg.contains("data-chart=\"x&quot;y\""));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // Only the one good point is drawn.
        assert_eq!(svg.matches("<circle").count(), 1);
        let legend = legend(&[s]);
        assert!(!legend.contains("<script>") && legend.contains("dashed"));
    }

    #[test]
    fn axis_scales_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.2), 2.0);
        assert_eq!(nice_ceiling(2.2), 2.5);
        assert_eq!(nice_ceiling(170.0), 200.0);
        assert_eq!(nice_ceiling(f64::NAN), 1.0);
        assert_eq!(Unit::Share.format(0.5), "50%");
        assert_eq!(Unit::Milliseconds.format(152.34), "152 ms");
        assert_eq!(Unit::PerSecond.format(0.25), "0.25/s");
    }
}
