//! The status page on `/`: the `/status` document rendered as one self-contained HTML page
//! (inline CSS, no scripts, no external assets), readable at a glance by an operator.
//! Rendering from the document itself means the page and `/status` never disagree.

use std::fmt::Write as _;

use serde_json::Value;

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
th{background:#eef1f4;font-size:.8em;text-transform:uppercase;color:#4a5560}\
td.err{white-space:normal;color:#8a2a1f;font-size:.9em}\
.ok{color:#fff;background:#1f8a4c}.bad{color:#fff;background:#c0392b}.warn{color:#1d2329;background:#f1c40f}.mute{color:#fff;background:#7f8c8d}\
.badge{border-radius:4px;padding:.05em .5em;font-size:.85em;font-weight:600}\
footer{margin-top:1.5em;color:#6b7680;font-size:.85em}";

fn badge(class: &str, label: &str) -> String {
    format!("<span class=\"badge {class}\">{}</span>", esc(label))
}

/// The status page: the `/status` document, readable at a glance.
pub fn render_page(status: &Value) -> String {
    let mut page = String::with_capacity(8 * 1024);
    let ready = status["ready"].as_bool().unwrap_or(false);
    let draining = status["draining"].as_bool().unwrap_or(false);
    let state = if draining {
        badge("warn", "draining")
    } else if ready {
        badge("ok", "ready")
    } else {
        badge("bad", "starting")
    };
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
        "<h1>gpulink {} {state}</h1>",
        show(&status["version"])
    );
    let rollback = if status["rollback"]["active"].as_bool() == Some(true) {
        badge("bad", "rolled back to public")
    } else if status["rollback"]["configured"].as_bool() == Some(true) {
        badge("ok", "armed")
    } else {
        badge("mute", "off")
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
    let _ = write!(
        page,
        "<div class=\"facts\">\
         <div class=\"fact\"><b>phase</b>{}</div>\
         <div class=\"fact\"><b>generation</b><span id=\"generation\">{}</span></div>\
         <div class=\"fact\"><b>endpoints serving</b>{serving_badge}</div>\
         <div class=\"fact\"><b>public fallback</b>{fallback} (until {})</div>\
         <div class=\"fact\"><b>auto rollback</b>{rollback}</div>\
         <div class=\"fact\"><b>tenant</b>{}</div>\
         <div class=\"fact\"><b>uptime</b>{} s</div>\
         <div class=\"fact\"><b>reloads</b>{} applied, {} rejected</div>\
         </div>",
        show(&status["phase"]),
        show(&status["generation"]),
        show(&status["public_fallback_until"]),
        show(&status["tenant"]),
        show(&status["uptime_seconds"]),
        show(&status["reloads"]["applied"]),
        show(&status["reloads"]["rejected"]),
    );

    page.push_str(
        "<h2>Endpoints</h2><table><thead><tr><th>endpoint</th><th>tier</th><th>region</th>\
         <th>health</th><th>data path</th><th>capacity</th><th>latency</th><th>in flight</th><th>requests</th>\
         <th>failures</th><th>ejections</th><th>why not serving</th><th>last request error</th></tr></thead><tbody>",
    );
    for e in &endpoints {
        let health = e["health"].as_str().unwrap_or("unknown");
        let health_badge = if e["ejected"].as_bool() == Some(true) {
            badge("bad", "ejected")
        } else if health == "healthy" && e["capacity"].as_u64() == Some(0) {
            badge("warn", "full")
        } else if health == "healthy" {
            badge("ok", "healthy")
        } else if health == "unhealthy" {
            badge("bad", "unhealthy")
        } else {
            badge("mute", health)
        };
        let data_path = e["data_path"]["state"].as_str().unwrap_or("unknown");
        let data_path_badge = match data_path {
            "ok" => badge("ok", "ok"),
            "failed" => badge("bad", "failed"),
            other => badge("mute", other),
        };
        let latency = match e["latency_ms"].as_f64() {
            Some(ms) => format!("{ms:.1} ms"),
            None => "-".into(),
        };
        // The failing checks' diagnoses (the same words `gpulink probe` uses), else the
        // last health error while below the threshold.
        let mut why = Vec::new();
        if e["health"] == "unhealthy" {
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
        let request_error = &e["last_request_error"];
        let request_error = if request_error.is_null() {
            "-".to_string()
        } else {
            format!(
                "{} {}",
                show(&request_error["at"]),
                show(&request_error["message"])
            )
        };
        let _ = write!(
            page,
            "<tr data-endpoint=\"{}\" data-health=\"{}\" data-path=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{health_badge}</td>\
             <td>{data_path_badge}</td><td>{}</td><td>{latency}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"err\">{why}</td><td class=\"err\">{request_error}</td></tr>",
            show(&e["address"]),
            esc(health),
            esc(data_path),
            show(&e["address"]),
            show(&e["tier"]),
            show(&e["region"]),
            show(&e["capacity"]),
            show(&e["in_flight"]),
            show(&e["requests"]),
            show(&e["failures"]),
            show(&e["ejections"]),
        );
    }
    page.push_str("</tbody></table>");

    let kms = &status["kms"];
    let kms_badge = if kms["last_error"].is_null() {
        if kms["last_success"].is_null() {
            badge("mute", "no call yet")
        } else {
            badge("ok", "ok")
        }
    } else if kms["last_success"].as_str() > kms["last_error"].as_str() {
        badge("warn", "recovered")
    } else {
        badge("bad", "failing")
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
         <div class=\"fact\"><b>last error</b>{} {}</div>\
         <div class=\"fact\"><b>data-key cache</b>{} hits, {} misses, {} entries</div>\
         </div>",
        show(&kms["provider"]),
        show(&kms["key_id"]),
        show(&kms["region"]),
        show(&kms["format"]),
        show(&kms["context"]),
        show(&kms["calls"]),
        show(&kms["failures"]),
        show(&kms["last_success"]),
        show(&kms["last_error"]),
        show(&kms["last_error_message"]),
        show(&status["key_cache"]["hits"]),
        show(&status["key_cache"]["misses"]),
        status["key_cache"]["entries"]
            .as_array()
            .map_or(0, |entries| entries.len()),
    );
    let _ = write!(
        page,
        "<footer>Refreshes every {PAGE_REFRESH_SECONDS} s. Machine-readable: \
         <a href=\"/status\">/status</a>, <a href=\"/metrics\">/metrics</a>; \
         <a href=\"/ready\">/ready</a>, <a href=\"/live\">/live</a>.</footer></body></html>"
    );
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
                    "format": "KmsDirect", "context": "Tenant", "calls": 1, "failures": 0,
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
}
