//! The status page on `/`: the `/status` document rendered as one self-contained HTML page
//! (inline CSS and SVG, no scripts, no external assets), readable at a glance by an
//! operator: whether requests succeed, their outcomes per route, charts of the last 15
//! minutes, every endpoint's state, KMS. Rendering from the document itself means the
//! page and `/status` never disagree. Times are relative to the document's `now`.

use std::fmt::Write as _;

use serde_json::Value;

use super::chart;

/// How often the status page reloads itself.
const PAGE_REFRESH_SECONDS: u32 = 5;

/// Escapes text for HTML element content and attribute values.
pub(crate) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as page text: strings bare, null as a dash.
fn show(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => esc(s),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => esc(&other.to_string()),
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em;color:#1d2329;background:#f7f8fa}\
h1{font-size:1.3em;margin:0 0 .3em}h2{font-size:1.05em;margin:1.4em 0 .4em}\
.facts{display:flex;flex-wrap:wrap;gap:.5em}.fact{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:.4em .8em}\
.fact b{display:block;font-size:.75em;color:#5a6570;font-weight:600;text-transform:uppercase}\
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e6;width:100%}\
th,td{padding:.35em .7em;border-bottom:1px solid #eef0f2;text-align:left;white-space:nowrap}\
td.num{text-align:right;font-variant-numeric:tabular-nums}\
th{background:#eef1f4;font-size:.8em;text-transform:uppercase;color:#4a5560}\
td.err{white-space:normal;color:#8a2a1f;font-size:.9em;min-width:12em}td.hot{color:#8a2a1f}\
.ok{color:#fff;background:#1f8a4c}.bad{color:#fff;background:#c0392b}.warn{color:#1d2329;background:#f1c40f}.mute{color:#fff;background:#7f8c8d}\
.badge{border-radius:4px;padding:.05em .5em;font-size:.85em;font-weight:600}\
.since{display:block;font-size:.8em;color:#5a6570}\
.charts{display:flex;flex-wrap:wrap;gap:.8em}.panel{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:.5em .7em}\
.panel h3{font-size:.85em;margin:0 0 .2em;color:#4a5560;text-transform:uppercase}\
.legend{font-size:.8em;color:#4a5560}.legend span{margin-right:1em}.legend i{display:inline-block;width:1.6em;margin-right:.3em;vertical-align:middle}\
.codes{margin:.5em 0 0;font-size:.9em}.codes code{background:#eef1f4;border-radius:3px;padding:0 .3em}\
footer{margin-top:1.5em;color:#6b7680;font-size:.85em}";

/// The two routes the charts compare, with their colours.
const ROUTES: [(&str, &str, &str); 2] = [
    ("privatelink", "PrivateLink", "#2563eb"),
    ("public", "public", "#d97706"),
];

fn badge(class: &str, label: &str) -> String {
    format!("<span class=\"badge {class}\">{}</span>", esc(label))
}

/// A duration the way an operator says it: "45 s", "4 min", "2 h 5 min", "3 d 2 h".
pub(crate) fn human_duration(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => match (s / 3600, s % 3600 / 60) {
            (h, 0) => format!("{h} h"),
            (h, m) => format!("{h} h {m} min"),
        },
        s => match (s / 86_400, s % 86_400 / 3600) {
            (d, 0) => format!("{d} d"),
            (d, h) => format!("{d} d {h} h"),
        },
    }
}

type Time = chrono::DateTime<chrono::Utc>;

fn parse_time(value: &Value) -> Option<Time> {
    let text = value.as_str()?;
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

fn seconds_between(from: Time, to: Time) -> u64 {
    u64::try_from((to - from).num_seconds()).unwrap_or(0)
}

/// `at` relative to `now` ("3 s ago"), the exact time (to the second) as its tooltip;
/// a dash for no time.
fn ago(now: Time, at: &Value) -> String {
    match parse_time(at) {
        None => "-".into(),
        Some(t) => {
            let exact = t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let seconds = seconds_between(t, now);
            let text = if seconds == 0 {
                "just now".to_string()
            } else {
                format!("{} ago", human_duration(seconds))
            };
            format!("<time datetime=\"{exact}\" title=\"{exact}\">{text}</time>")
        }
    }
}

/// Milliseconds with the precision that means something at that size.
fn millis(ms: f64) -> String {
    if !ms.is_finite() {
        "-".into()
    } else if ms < 1.0 {
        "&lt;1 ms".into()
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn percent(share: f64) -> String {
    let p = share * 100.0;
    if p == 0.0 {
        "0%".into()
    } else if p < 0.1 {
        "&lt;0.1%".into()
    } else if p < 10.0 {
        format!("{p:.1}%")
    } else {
        format!("{p:.0}%")
    }
}

fn points(values: &Value) -> Vec<Option<f64>> {
    values
        .as_array()
        .map(|a| a.iter().map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// Top error codes as `code × n` items.
fn codes(list: &Value) -> String {
    let items: Vec<String> = list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| format!("<code>{}</code> × {}", show(&c["code"]), show(&c["count"])))
                .collect()
        })
        .unwrap_or_default();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

/// Whether requests are succeeding, over the ring's window: the verdict an operator
/// reads first, next to readiness (a ready gpulink whose requests all fail is not green).
fn traffic_verdict(traffic: &Value) -> (String, String) {
    let routes = &traffic["routes"];
    let sum = |key: &str| -> u64 {
        ["privatelink", "public", "none"]
            .iter()
            .map(|r| routes[r][key].as_u64().unwrap_or(0))
            .sum()
    };
    let (total, failed) = (sum("requests"), sum("5xx"));
    let minutes = traffic["window_seconds"].as_f64().unwrap_or(0.0) / 60.0;
    let span = if minutes >= 14.5 {
        "15 min".to_string()
    } else {
        human_duration((minutes * 60.0) as u64)
    };
    if total == 0 {
        return (
            badge("mute", "no requests"),
            format!("none in the last {span}"),
        );
    }
    let share = failed as f64 / total as f64;
    let class = if failed == 0 {
        "ok"
    } else if share < 0.05 {
        "warn"
    } else {
        "bad"
    };
    let label = if failed == 0 {
        "requests succeeding".to_string()
    } else {
        format!(
            "{} of requests failing",
            percent(share).replace("&lt;", "<")
        )
    };
    (
        badge(class, &label),
        format!("{total} in the last {span}, {failed} failed (5xx)"),
    )
}

fn traffic_section(page: &mut String, traffic: &Value) {
    let routes = &traffic["routes"];
    page.push_str(
        "<h2>Requests, last 15 minutes</h2><table id=\"traffic\"><thead><tr><th>route</th>\
         <th>requests</th><th>rate</th><th>2xx</th><th>4xx</th><th>5xx</th><th>error rate (5xx)</th>\
         <th>p50</th><th>p99</th><th>top error codes</th></tr></thead><tbody>",
    );
    let rows = [
        ("privatelink", "PrivateLink"),
        ("public", "public"),
        ("none", "before routing"),
    ];
    for (key, name) in rows {
        let r = &routes[key];
        let total = r["requests"].as_u64().unwrap_or(0);
        // Answers made before routing (refusals, KMS down) only when there are some.
        if key == "none" && total == 0 {
            continue;
        }
        let rate = r["per_second"].as_f64().unwrap_or(0.0);
        let error_rate = r["error_rate"].as_f64().map_or("-".to_string(), percent);
        let error_class = match r["5xx"].as_u64() {
            Some(0) | None => "",
            Some(_) => " hot",
        };
        let quantile = |k: &str| r[k].as_f64().map_or("-".to_string(), millis);
        let _ = write!(
            page,
            "<tr data-route=\"{key}\"><td>{name}</td><td class=\"num\">{total}</td>\
             <td class=\"num\">{rate:.2}/s</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num{error_class}\">{}</td><td class=\"num{error_class}\">{error_rate}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"err\">{}</td></tr>",
            show(&r["2xx"]),
            show(&r["4xx"]),
            show(&r["5xx"]),
            quantile("p50_ms"),
            quantile("p99_ms"),
            codes(&r["top_errors"]),
        );
    }
    page.push_str("</tbody></table>");
    let _ = write!(
        page,
        "<p class=\"codes\"><b>Top error codes</b>: {} <span class=\"since\">gpulink's codes \
         (<code>no_endpoint</code>, <code>upstream_timeout</code>, ...) as the app received them; \
         <code>cluster_NNN</code>: the cluster answered with that status. Latency: to the \
         response headers, answers from the cluster only.</span></p>",
        codes(&traffic["top_errors"])
    );

    let series = &traffic["series"];
    let span = (traffic["buckets"].as_u64().unwrap_or(90)
        * traffic["bucket_seconds"].as_u64().unwrap_or(10)
        / 60) as u32;
    let per_route = |metric: &str, dashed: bool, suffix: &str| -> Vec<chart::Series<'static>> {
        ROUTES
            .iter()
            .map(|(key, name, color)| chart::Series {
                label: format!("{name}{suffix}"),
                color,
                dashed,
                points: points(&series[*key][metric]),
            })
            .collect()
    };
    let requests = per_route("requests_per_second", false, "");
    let errors = per_route("error_rate", false, "");
    let mut latency = Vec::new();
    for (p50, p99) in per_route("p50_ms", false, " p50")
        .into_iter()
        .zip(per_route("p99_ms", true, " p99"))
    {
        latency.push(p50);
        latency.push(p99);
    }
    page.push_str("<div class=\"charts\">");
    for (id, title, unit, lines) in [
        (
            "requests_per_second",
            "requests per second",
            chart::Unit::PerSecond,
            &requests,
        ),
        (
            "error_rate",
            "error rate (5xx)",
            chart::Unit::Share,
            &errors,
        ),
        (
            "latency",
            "latency p50 / p99",
            chart::Unit::Milliseconds,
            &latency,
        ),
    ] {
        let _ = write!(
            page,
            "<div class=\"panel\"><h3>{}</h3>{}{}</div>",
            esc(title),
            chart::line_chart(id, title, unit, span, lines),
            chart::legend(lines)
        );
    }
    page.push_str("</div>");
}

/// The status page: the `/status` document, readable at a glance.
pub fn render_page(status: &Value) -> String {
    let now = parse_time(&status["now"]).unwrap_or_else(chrono::Utc::now);
    let mut page = String::with_capacity(32 * 1024);
    let ready = status["ready"].as_bool().unwrap_or(false);
    let draining = status["draining"].as_bool().unwrap_or(false);
    let state = if draining {
        badge("warn", "draining")
    } else if ready {
        badge("ok", "ready")
    } else {
        badge("bad", "starting")
    };
    let (verdict, verdict_text) = traffic_verdict(&status["traffic"]);
    let endpoints = status["endpoints"].as_array().cloned().unwrap_or_default();
    let serving = endpoints
        .iter()
        .filter(|e| e["serving"].as_bool() == Some(true))
        .count();
    let _ = write!(
        page,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{PAGE_REFRESH_SECONDS}\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>gpulink {}: {} of {} endpoints serving</title><style>{STYLE}</style></head><body>",
        show(&status["tenant"]),
        serving,
        endpoints.len()
    );
    let _ = write!(
        page,
        "<h1>gpulink {} {state} {verdict}</h1>",
        show(&status["version"])
    );
    let rollback = if status["rollback"]["active"].as_bool() == Some(true) {
        badge("bad", "rolled back to public")
    } else if status["rollback"]["configured"].as_bool() == Some(true) {
        badge("ok", "armed")
    } else {
        badge("mute", "off")
    };
    let fallback_until = match parse_time(&status["public_fallback_until"]) {
        None => "no end set".to_string(),
        Some(until) if until > now => format!(
            "until {} (in {})",
            until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            human_duration(seconds_between(now, until))
        ),
        Some(until) => format!(
            "ended {}",
            until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
    };
    let fallback = if status["public_fallback_open"].as_bool() == Some(true) {
        "open"
    } else {
        "closed"
    };
    let serving_badge = if serving == 0 {
        badge("bad", &format!("{serving} of {}", endpoints.len()))
    } else if serving < endpoints.len() {
        badge("warn", &format!("{serving} of {}", endpoints.len()))
    } else {
        badge("ok", &format!("{serving} of {}", endpoints.len()))
    };
    let uptime = status["uptime_seconds"]
        .as_u64()
        .map_or("-".to_string(), human_duration);
    let _ = write!(
        page,
        "<div class=\"facts\">\
         <div class=\"fact\"><b>requests</b>{verdict_text}</div>\
         <div class=\"fact\"><b>phase</b>{}</div>\
         <div class=\"fact\"><b>generation</b><span id=\"generation\">{}</span> (loaded {})</div>\
         <div class=\"fact\"><b>endpoints serving</b>{serving_badge}</div>\
         <div class=\"fact\"><b>public fallback</b>{fallback} ({})</div>\
         <div class=\"fact\"><b>auto rollback</b>{rollback}</div>\
         <div class=\"fact\"><b>tenant</b>{}</div>\
         <div class=\"fact\"><b>this host's zone</b>{}</div>\
         <div class=\"fact\"><b>uptime</b>{uptime}</div>\
         <div class=\"fact\"><b>reloads</b>{} applied, {} rejected</div>\
         </div>",
        show(&status["phase"]),
        show(&status["generation"]),
        ago(now, &status["loaded_at"]),
        esc(&fallback_until),
        show(&status["tenant"]),
        host_zone(&status["placement"]),
        show(&status["reloads"]["applied"]),
        show(&status["reloads"]["rejected"]),
    );

    traffic_section(&mut page, &status["traffic"]);

    page.push_str(
        "<h2>Endpoints</h2><table><thead><tr><th>endpoint</th><th>tier</th><th>region</th>\
         <th>zone</th><th>health</th><th>data path</th><th>capacity</th><th>latency</th><th>in flight</th><th>requests</th>\
         <th>failures</th><th>ejections</th><th>why not serving</th><th>last request error</th></tr></thead><tbody>",
    );
    for e in &endpoints {
        endpoint_row(&mut page, e, now);
    }
    page.push_str("</tbody></table>");
    discovery_section(&mut page, &status["discovery"], now);

    let kms = &status["kms"];
    let kms_badge = if kms["last_error"].is_null() {
        if kms["last_success"].is_null() {
            badge("mute", "no call yet")
        } else {
            badge("ok", "ok")
        }
    } else if parse_time(&kms["last_success"]) > parse_time(&kms["last_error"]) {
        badge("warn", "recovered")
    } else {
        badge("bad", "failing")
    };
    let kms_last_error = if kms["last_error"].is_null() {
        "none".to_string()
    } else {
        format!(
            "{}: {}",
            ago(now, &kms["last_error"]),
            show(&kms["last_error_message"])
        )
    };
    let _ = write!(
        page,
        "<h2>KMS {kms_badge}</h2><div class=\"facts\">\
         <div class=\"fact\"><b>provider</b>{}</div>\
         <div class=\"fact\"><b>key</b>{}</div>\
         <div class=\"fact\"><b>region</b>{}</div>\
         <div class=\"fact\"><b>format</b>{} / context {}</div>\
         <div class=\"fact\"><b>calls</b>{} ({} failed)</div>\
         <div class=\"fact\"><b>last success</b>{}</div>\
         <div class=\"fact\"><b>last error</b>{kms_last_error}</div>\
         <div class=\"fact\"><b>data-key cache</b>{} hits, {} misses, {} entries</div>\
         </div>",
        show(&kms["provider"]),
        show(&kms["key_id"]),
        show(&kms["region"]),
        show(&kms["format"]),
        show(&kms["context"]),
        show(&kms["calls"]),
        show(&kms["failures"]),
        ago(now, &kms["last_success"]),
        show(&status["key_cache"]["hits"]),
        show(&status["key_cache"]["misses"]),
        status["key_cache"]["entries"]
            .as_array()
            .map_or(0, |entries| entries.len()),
    );
    let _ = write!(
        page,
        "<footer>As of <time datetime=\"{now}\">{now}</time>; refreshes every {PAGE_REFRESH_SECONDS} s. \
         Machine-readable: <a href=\"/status\">/status</a>, <a href=\"/metrics\">/metrics</a>; \
         <a href=\"/ready\">/ready</a>, <a href=\"/live\">/live</a>.</footer></body></html>",
        now = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    );
    page
}

/// The regions whose ENIs are discovered (`/status` `discovery`): none, no section.
fn discovery_section(page: &mut String, discovery: &Value, now: Time) {
    let Some(regions) = discovery.as_array().filter(|r| !r.is_empty()) else {
        return;
    };
    page.push_str(
        "<h2>PrivateLink discovery</h2><table><thead><tr><th>region</th><th>source</th>\
         <th>condition</th><th>endpoint state</th><th>addresses</th><th>last success</th>\
         <th>last error</th><th>what to do</th></tr></thead><tbody>",
    );
    for r in regions {
        let condition = r["condition"].as_str().unwrap_or("unknown");
        let class = match condition {
            "ok" => "ok",
            "failing" | "not_available" => "bad",
            "no_addresses" => "warn",
            _ => "mute",
        };
        let _ = write!(
            page,
            "<tr data-discovery=\"{}\"><td>{}</td><td>{} {}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(condition),
            show(&r["region"]),
            show(&r["source"]),
            show(&r["target"]),
            badge(class, condition),
            show(&r["state"]),
            show(&r["addresses"]),
            ago(now, &r["last_ok"]),
            show(&r["last_error"]),
            show(&r["message"]),
        );
    }
    page.push_str("</tbody></table>");
}

/// This host's zone as zone-aware routing sees it: the zone (and the name IMDS gave
/// beside its id) and where it came from; without one, why not, since then routing
/// ignores zones.
fn host_zone(placement: &Value) -> String {
    match placement["zone"].as_str() {
        Some(zone) => {
            let mut text = format!("<code>{}</code>", esc(zone));
            if let Some(alias) = placement["alias"].as_str() {
                let _ = write!(text, " (<code>{}</code>)", esc(alias));
            }
            let _ = write!(text, " from {}", show(&placement["source"]));
            text
        }
        None => {
            let mut text = badge("mute", "unknown");
            if let Some(note) = placement["note"].as_str() {
                let _ = write!(text, " {}", esc(note));
            }
            text.push_str(" (zone-aware routing off)");
            text
        }
    }
}

/// An endpoint's zone, with a badge saying whether it is in this host's zone.
fn endpoint_zone(e: &Value) -> String {
    let Some(zone) = e["zone"].as_str() else {
        return "-".to_string();
    };
    let locality = match e["locality"].as_str() {
        Some("same_zone") => badge("ok", "same zone"),
        Some("cross_zone") => badge("mute", "other zone"),
        _ => String::new(),
    };
    format!("<code>{}</code> {locality}", esc(zone))
}

fn endpoint_row(page: &mut String, e: &Value, now: Time) {
    let health = e["health"].as_str().unwrap_or("unknown");
    let data_path = e["data_path"]["state"].as_str().unwrap_or("unknown");
    let healthy = health == "healthy";
    let health_badge = if e["ejected"].as_bool() == Some(true) {
        badge("bad", "ejected")
    } else if healthy && e["capacity"].as_u64() == Some(0) {
        badge("warn", "full")
    } else if healthy {
        badge("ok", "healthy")
    } else if health == "unhealthy" {
        badge("bad", "unhealthy")
    } else {
        badge("mute", health)
    };
    // How long it has been out, from the check that took it out.
    let down_since = |since: &Value| {
        parse_time(since).map_or(String::new(), |t| {
            format!(
                "<span class=\"since\">down for {}</span>",
                human_duration(seconds_between(t, now))
            )
        })
    };
    let health_since = if e["ejected"].as_bool() == Some(true) {
        e["ejected_for_ms"].as_u64().map_or(String::new(), |ms| {
            format!(
                "<span class=\"since\">for {}</span>",
                human_duration(ms / 1000)
            )
        })
    } else if health == "unhealthy" {
        down_since(&e["health_since"])
    } else {
        String::new()
    };
    let data_path_badge = match data_path {
        "ok" => badge("ok", "ok"),
        "failed" => format!(
            "{}{}",
            badge("bad", "failed"),
            down_since(&e["data_path"]["since"])
        ),
        other => badge("mute", other),
    };
    // A down endpoint's capacity and latency are the last ones it had: not shown as
    // if current.
    let capacity = if healthy {
        show(&e["capacity"])
    } else {
        "-".to_string()
    };
    let latency = match e["latency_ms"].as_f64() {
        Some(ms) if e["serving"].as_bool() == Some(true) => millis(ms),
        _ => "-".into(),
    };
    // The failing checks' diagnoses (the same words `gpulink probe` uses), else the
    // last health error while below the threshold.
    let mut why = Vec::new();
    if health == "unhealthy" {
        let text = e["health_diagnosis"]
            .as_str()
            .or(e["last_error"].as_str())
            .unwrap_or("health check failing");
        why.push(format!("<b>health</b>: {}", esc(text)));
    }
    if data_path == "failed" {
        let problem = e["data_path"]["problem"].as_str().unwrap_or("failed");
        let text = e["data_path"]["diagnosis"]
            .as_str()
            .or(e["data_path"]["last_error"].as_str())
            .unwrap_or("data-path check failing");
        why.push(format!(
            "<b>data path</b> ({}): {}",
            esc(problem),
            esc(text)
        ));
    }
    if why.is_empty() && !e["last_error"].is_null() {
        why.push(show(&e["last_error"]));
    }
    let why = if why.is_empty() {
        "-".to_string()
    } else {
        why.join("<br>")
    };
    // The newer of the last connection-level failure and the last 5xx answer.
    let connect = &e["last_request_error"];
    let answered = &e["last_failed_request"];
    let newest = match (parse_time(&connect["at"]), parse_time(&answered["at"])) {
        (Some(c), Some(a)) if a > c => Some(answered),
        (Some(_), _) => Some(connect),
        (None, Some(_)) => Some(answered),
        (None, None) => None,
    };
    let request_error = match newest {
        None => "-".to_string(),
        Some(error) => {
            let mut text = ago(now, &error["at"]);
            if !error["code"].is_null() {
                let _ = write!(
                    text,
                    " {} <code>{}</code>",
                    show(&error["status"]),
                    show(&error["code"])
                );
            }
            if !error["message"].is_null() {
                let _ = write!(text, ": {}", show(&error["message"]));
            }
            text
        }
    };
    let zone = endpoint_zone(e);
    let _ = write!(
        page,
        "<tr data-endpoint=\"{}\" data-health=\"{}\" data-path=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{zone}</td><td>{health_badge}{health_since}</td>\
         <td>{data_path_badge}</td><td class=\"num\">{capacity}</td><td class=\"num\">{latency}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
         <td class=\"err\">{why}</td><td class=\"err\">{request_error}</td></tr>",
        show(&e["address"]),
        esc(health),
        esc(data_path),
        show(&e["address"]),
        show(&e["tier"]),
        show(&e["region"]),
        show(&e["in_flight"]),
        show(&e["requests"]),
        show(&e["failures"]),
        show(&e["ejections"]),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn page_shows_the_host_zone_and_each_endpoints_locality() {
        let mut status = busy_status();
        let second = status["endpoints"][0].clone();
        status["endpoints"]
            .as_array_mut()
            .expect("a list")
            .push(second);
        status["placement"] =
            json!({"zone": "use1-az1", "alias": "us-east-1a", "source": "imds", "note": null});
        status["endpoints"][0]["zone"] = json!("use1-az1");
        status["endpoints"][0]["locality"] = json!("same_zone");
        status["endpoints"][1]["zone"] = json!("use1-<b>az2");
        status["endpoints"][1]["locality"] = json!("cross_zone");
        let page = render_page(&status);
        assert!(page.contains("<code>use1-az1</code> (<code>us-east-1a</code>) from imds"));
        assert!(page.contains("<code>use1-az1</code> <span class=\"badge ok\">same zone</span>"));
        assert!(page.contains(
            "<code>use1-&lt;b&gt;az2</code> <span class=\"badge mute\">other zone</span>"
        ));

        status["placement"] =
            json!({"zone": null, "alias": null, "source": "none", "note": "IMDS disabled"});
        let page = render_page(&status);
        assert!(page.contains("unknown</span> IMDS disabled (zone-aware routing off)"));
    }

    #[test]
    fn escapes_html() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn page_shows_every_endpoint_and_escapes_errors() {
        let status = json!({
            "version": "0.1.0", "ready": true, "draining": false, "generation": 3,
            "phase": "privatelink", "tenant": "tenant-123", "uptime_seconds": 5,
            "public_fallback_open": true, "public_fallback_until": null,
            "rollback": {"configured": false, "active": false},
            "reloads": {"applied": 2, "rejected": 0},
            "kms": {"provider": "aws-kms", "key_id": "arn:k", "region": "us-east-1",
                    "format": "KmsDirect", "context": "tenant", "calls": 1, "failures": 0,
                    "last_success": "2026-01-01T00:00:00Z", "last_error": null, "last_error_message": null},
            "key_cache": {"hits": 0, "misses": 0},
            "endpoints": [
                {"address": "10.0.0.1:443", "tier": "local privatelink", "region": "us-east-1",
                 "health": "healthy", "serving": true, "capacity": 45, "latency_ms": 1.25,
                 "in_flight": 0, "requests": 3, "failures": 0, "ejections": 0, "last_error": null},
                {"address": "10.0.0.2:443", "tier": "local privatelink", "region": "us-east-1",
                 "health": "unhealthy", "serving": false, "capacity": null, "latency_ms": null,
                 "in_flight": 0, "requests": 0, "failures": 1, "ejections": 0,
                 "last_error": "<script>alert(1)</script>"},
                {"address": "10.0.0.3:443", "tier": "local privatelink", "region": "us-east-1",
                 "health": "healthy", "serving": false, "capacity": 45, "latency_ms": null,
                 "in_flight": 0, "requests": 1, "failures": 1, "ejections": 0, "last_error": null,
                 "data_path": {"state": "failed", "problem": "tls_unknown_ca",
                               "diagnosis": "untrusted CA: set upstream.ca_file"},
                 "last_request_error": {"at": "2026-01-01T00:00:00Z", "message": "TLS <failed>"}}
            ]
        });
        let page = render_page(&status);
        assert!(
            !page.contains("PrivateLink discovery"),
            "no discovered region, no section"
        );
        assert!(page.contains("10.0.0.1:443") && page.contains("10.0.0.2:443"));
        assert!(page.contains("data-health=\"unhealthy\""));
        assert!(page.contains("1 of 3"));
        assert!(page.contains("data-path=\"failed\""));
        assert!(page.contains("untrusted CA: set upstream.ca_file"));
        assert!(page.contains("TLS &lt;failed&gt;"));
        assert!(!page.contains("<script>"));
        assert!(page.contains("http-equiv=\"refresh\""));
        assert!(!page.contains("http://") && !page.contains("https://"));
    }

    #[test]
    fn page_shows_discovery_and_what_to_do() {
        let status = json!({
            "phase": "privatelink", "kms": {}, "key_cache": {}, "endpoints": [],
            "now": "2026-01-01T00:10:00.000Z",
            "discovery": [{
                "region": "us-east-1", "source": "ec2", "target": "vpce-0abcd1234ef567890",
                "condition": "not_available", "state": "pendingAcceptance", "addresses": 0,
                "last_ok": "2026-01-01T00:09:00Z", "last_error": null,
                "message": "the endpoint waits for the GPU cluster team to <accept> it",
            }],
        });
        let page = render_page(&status);
        assert!(page.contains("PrivateLink discovery"), "{page}");
        assert!(page.contains("data-discovery=\"not_available\""));
        assert!(page.contains("pendingAcceptance"));
        assert!(page.contains("vpce-0abcd1234ef567890"));
        assert!(page.contains("to &lt;accept&gt; it"), "escaped");
    }

    /// A `/status` document with traffic on both routes and a down endpoint.
    fn busy_status() -> Value {
        let mut rps = vec![Value::Null; 60];
        rps.extend((0..30).map(|i| json!(2.0 + f64::from(i % 5))));
        let mut p50 = vec![Value::Null; 60];
        p50.extend((0..30).map(|i| json!(150.0 + f64::from(i % 3))));
        let mut errors = vec![Value::Null; 60];
        errors.extend((0..30).map(|i| json!(if i == 20 { 0.5 } else { 0.0 })));
        json!({
            "version": "0.1.0", "ready": true, "draining": false, "generation": 2,
            "now": "2026-01-01T00:10:00.000Z",
            "loaded_at": "2026-01-01T00:07:00.123456789+00:00",
            "phase": "canary", "tenant": "t", "uptime_seconds": 300,
            "public_fallback_open": true, "public_fallback_until": "2026-01-01T01:10:00Z",
            "rollback": {"configured": true, "active": false},
            "reloads": {"applied": 1, "rejected": 0},
            "kms": {"provider": "aws-kms", "key_id": "arn:k", "region": "us-east-1",
                    "format": "aws-esdk", "context": "tenant", "calls": 1, "failures": 0,
                    "last_success": "2026-01-01T00:09:57.987654321+00:00", "last_error": null,
                    "last_error_message": null},
            "key_cache": {"hits": 0, "misses": 0},
            "traffic": {
                "bucket_seconds": 10, "buckets": 90, "window_seconds": 300.0,
                "routes": {
                    "privatelink": {"requests": 1200, "2xx": 1190, "4xx": 4, "5xx": 6, "other": 0,
                        "per_second": 4.0, "error_rate": 0.005, "p50_ms": 151.0, "p99_ms": 240.0,
                        "top_errors": [{"code": "upstream_timeout", "count": 6}]},
                    "public": {"requests": 300, "2xx": 300, "4xx": 0, "5xx": 0, "other": 0,
                        "per_second": 1.0, "error_rate": 0.0, "p50_ms": 171.0, "p99_ms": 260.0,
                        "top_errors": []},
                    "none": {"requests": 0, "2xx": 0, "4xx": 0, "5xx": 0, "other": 0,
                        "per_second": 0.0, "error_rate": null, "p50_ms": null, "p99_ms": null,
                        "top_errors": []}
                },
                "top_errors": [{"code": "upstream_timeout", "count": 6}, {"code": "cluster_500", "count": 2}],
                "series": {
                    "privatelink": {"requests_per_second": rps, "error_rate": errors, "p50_ms": p50, "p99_ms": p50},
                    "public": {"requests_per_second": rps, "error_rate": errors, "p50_ms": p50, "p99_ms": p50}
                }
            },
            "endpoints": [
                {"address": "10.0.0.2:443", "tier": "local privatelink", "region": "us-east-1",
                 "health": "unhealthy", "health_since": "2026-01-01T00:06:00Z", "serving": false,
                 "capacity": 45, "latency_ms": 0.0, "in_flight": 0, "requests": 7, "failures": 3,
                 "ejections": 0, "last_error": "connection refused",
                 "data_path": {"state": "ok"},
                 "last_request_error": {"at": "2026-01-01T00:09:50.5Z", "message": "connect refused"},
                 "last_failed_request": {"at": "2026-01-01T00:09:57Z", "status": 504,
                                         "code": "upstream_timeout", "message": "no headers <in> 30s"}}
            ]
        })
    }

    #[test]
    fn page_shows_outcomes_charts_and_relative_times() {
        let page = render_page(&busy_status());
        // Outcomes per route, the top codes and the verdict.
        assert!(page.contains("<tr data-route=\"privatelink\">"));
        assert!(page.contains(">1200<") && page.contains("4.00/s") && page.contains(">0.5%<"));
        assert!(page.contains("<code>upstream_timeout</code> × 6"));
        assert!(page.contains("<code>cluster_500</code> × 2"));
        assert!(page.contains("0.4% of requests failing"), "6 of 1500");
        assert!(!page.contains("data-route=\"none\""), "no refusals, no row");
        assert!(page.contains("151 ms") && page.contains("171 ms"));
        // Three charts, both routes drawn.
        for chart in ["requests_per_second", "error_rate", "latency"] {
            assert!(page.contains(&format!("data-chart=\"{chart}\"")), "{chart}");
        }
        assert!(page.contains("data-series=\"PrivateLink p99\""));
        assert!(page.matches("<polyline").count() >= 6);
        // Relative times, exact ones to the second, never nanoseconds.
        assert!(page.contains("loaded <time datetime=\"2026-01-01T00:07:00Z\" title=\"2026-01-01T00:07:00Z\">2 min ago"));
        assert!(page.contains(">2 s ago<"), "KMS last success");
        assert!(page.contains("title=\"2026-01-01T00:09:57Z\""));
        assert!(!page.contains("987654321") && !page.contains("123456789"));
        assert!(page.contains("in 1 h"));
        assert!(page.contains("uptime</b>5 min"));
        // The down endpoint: how long, no stale capacity or latency, the newest request
        // error (the 504 answer, newer than the connect failure), escaped.
        let row = &page[page.find("<tr data-endpoint=\"10.0.0.2:443\"").unwrap()..];
        let row = &row[..row.find("</tr>").unwrap()];
        assert!(row.contains("down for 4 min"), "{row}");
        assert!(!row.contains("0.0 ms") && !row.contains(">45<"), "{row}");
        assert!(row.contains("504 <code>upstream_timeout</code>"), "{row}");
        assert!(row.contains("no headers &lt;in&gt; 30s"), "{row}");
        // KMS without an error says so, not "- -".
        assert!(page.contains("last error</b>none"));
        assert!(!page.contains("- -"));
        assert!(page.contains("context tenant"));
    }

    #[test]
    fn page_without_traffic_says_so() {
        if let Ok(path) = std::env::var("GPULINK_WRITE_SAMPLE_PAGE") {
            let _ = std::fs::write(path, render_page(&busy_status()));
        }
        let mut status = busy_status();
        status["traffic"] = Value::Null;
        let page = render_page(&status);
        assert!(page.contains(">no requests<"));
        assert_eq!(page.matches("no requests yet").count(), 3);
        assert!(!page.contains("<polyline"));
    }

    #[test]
    fn durations_read_like_an_operator_says_them() {
        assert_eq!(human_duration(0), "0 s");
        assert_eq!(human_duration(59), "59 s");
        assert_eq!(human_duration(240), "4 min");
        assert_eq!(human_duration(3600), "1 h");
        assert_eq!(human_duration(3900), "1 h 5 min");
        assert_eq!(human_duration(90_000), "1 d 1 h");
    }
}
