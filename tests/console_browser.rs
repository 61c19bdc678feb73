//! The manager console (`/console`) end to end: its files are served with the right types and
//! a strict Content-Security-Policy; and, in Debian's headless `chromium` driven by
//! `playwright-core` (tests/browser/console.mjs), a manager signs in, watches a device push a
//! conflicting change, reviews it side by side and resolves it with the keyboard (the value
//! written shown), and the device receives the resolution as an ordinary delta; on a second
//! conflict a "keep" based on a value that changed meanwhile is refused and the conflict is
//! dismissed, writing nothing; a conflict a delete won shows who deleted the row and offers
//! keeping it deleted or restoring it with the other value, and the row comes back; rows show
//! by their labels and prices as money; conflicts are found by row label, field and user; a
//! broadcast shows as a banner.
//!
//! The test installs what it needs when it is missing (it runs as root on a fresh Debian
//! machine under `cargo test --workspace`): `chromium` with apt-get, and playwright-core (pinned
//! in tests/browser/package-lock.json) with `npm ci`. It fails, never skips, when it cannot.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::browser::{echo_and_keep, ensure_browser_tools, repo, target_dir, CHROMIUM};
use common::*;
use protocol::{ChangeStatus, ServerFrame};
use serde_json::{json, Value};
use synchub::config::{Secret, ServiceToken};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use uuid::Uuid;

const TENANT: &str = "console-store";
const SERVICE_TOKEN: &str = "alerts-service-token-0123456789";
const BROADCAST_TEXT: &str = "Card terminals are offline: take cash only";
/// The whole browser run, from launch to the last check.
const BROWSER_RUN: Duration = Duration::from_secs(240);




#[actix_web::test]
async fn console_files_are_served_with_types_caching_and_a_strict_policy() {
    let hub = TestHub::start().await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", hub.addr);

    let page = http.get(format!("{base}/console")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let header = |r: &reqwest::Response, name: &str| r.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&page, "cache-control"), "no-cache");
    assert_eq!(header(&page, "x-content-type-options"), "nosniff");
    let csp = header(&page, "content-security-policy");
    for part in ["default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'", "base-uri 'none'"] {
        assert!(csp.contains(part), "policy lacks {part}: {csp}");
    }
    assert!(csp.contains(&format!("connect-src 'self' ws://{0} wss://{0}", hub.addr)), "the page may open its WebSocket to this host only: {csp}");
    assert!(!csp.contains("unsafe"), "no unsafe-inline or unsafe-eval: {csp}");
    let etag = header(&page, "etag");
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/console/app.js"></script>"#));
    assert!(!html.contains("<script>") && !html.contains("style="), "no inline script or style: the policy forbids them");

    let again = http.get(format!("{base}/console")).header("If-None-Match", &etag).send().await.unwrap();
    assert_eq!(again.status(), 304, "an unchanged page is not sent twice");

    for (path, ty) in [("app.js", "text/javascript; charset=utf-8"), ("app.css", "text/css; charset=utf-8"), ("conflicts.js", "text/javascript; charset=utf-8")] {
        let r = http.get(format!("{base}/console/{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(header(&r, "content-type"), ty, "{path}");
        assert!(header(&r, "content-security-policy").starts_with("default-src 'none'"), "{path}");
        let body = r.text().await.unwrap();
        assert!(!body.contains("innerHTML"), "{path} builds DOM nodes, never markup from data");
    }
    let config: Value = http.get(format!("{base}/console/config.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(config["claims"]["tenant"], "tenant_id");
    assert!(config["tables"].as_array().unwrap().contains(&json!("products")));
    assert_eq!(http.get(format!("{base}/console/missing.js")).send().await.unwrap().status(), 404);
    let root = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap().get(format!("{base}/")).send().await.unwrap();
    assert_eq!((root.status().as_u16(), header(&root, "location").as_str()), (307, "/console"), "the hub's root points at the console");
    assert_eq!(http.get(format!("{base}/console/../Cargo.toml")).send().await.unwrap().status(), 404);
    hub.shutdown().await;
}

#[actix_web::test]
async fn manager_resolves_a_conflict_in_the_browser_and_the_device_receives_it() {
    ensure_browser_tools("the console test");
    // The devices' sockets are not read while the browser works; a long heartbeat keeps them.
    let hub = TestHub::start_with(|c| {
        c.heartbeat_timeout_ms = 600_000;
        c.service_tokens = vec![ServiceToken { name: "alerts".into(), token: Secret(SERVICE_TOKEN.into()), tenants: vec![] }];
    })
    .await;
    let (mut a, _, _) = Client::device(&hub, TENANT, "pos-a").await;
    let (mut b, _, _) = Client::device(&hub, TENANT, "pos-b").await;

    // Device A creates a product at 380; device B, offline since before, still sees no version
    // of it (base_version 0) and sets the price to 280 with an older clock.
    let id = Uuid::new_v4();
    let now = now_ms();
    let written = a.push(vec![upsert("products", json!({"id": id}), product(id, "Flat white", 380), 1, now, 0)]).await;
    assert_eq!(written[0].status, ChangeStatus::Applied);
    // A second product, whose conflict the manager dismisses.
    let dismissed_id = Uuid::new_v4();
    let written = a.push(vec![upsert("products", json!({"id": dismissed_id}), product(dismissed_id, "Oat milk", 90), 2, now, 0)]).await;
    assert_eq!(written[0].status, ChangeStatus::Applied);
    let oat_milk_version = written[0].seq.expect("written");

    let screenshot = target_dir().join("console-e2e.png");
    std::fs::create_dir_all(target_dir()).unwrap();
    let manager = token(TENANT, "manager-mia", "Manager", None);
    let mut node = tokio::process::Command::new("node")
        .arg(repo().join("tests/browser/console.mjs"))
        .current_dir(repo().join("tests/browser"))
        .env("CONSOLE_URL", format!("http://{}", hub.addr))
        .env("CONSOLE_TOKEN", &manager)
        .env("CONSOLE_EMPLOYEE_TOKEN", token(TENANT, "employee-eli", "Employee", None))
        // The same manager with a token that expires in two minutes, and a fresh one.
        .env("CONSOLE_SHORT_TOKEN", manager_token_for(120))
        .env("CONSOLE_FRESH_TOKEN", manager_token_for(7200))
        .env("CONSOLE_SCREENSHOT", &screenshot)
        .env("CHROMIUM", CHROMIUM)
        .env("E2E_DEVICES", "pos-a,pos-b")
        .env("E2E_WINNER", "380")
        .env("E2E_OTHER", "280")
        .env("E2E_BROADCAST", BROADCAST_TEXT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node starts (tests/browser/console.mjs)");
    let mut stdin = node.stdin.take().unwrap();
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let stderr_text = echo_and_keep(node.stderr.take().unwrap());

    let deadline = tokio::time::Instant::now() + BROWSER_RUN;
    let mut pushed = false;
    let mut output = Vec::new();
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(_) => break, // the script closed its output: it is finishing
            Err(_) => {
                let _ = node.kill().await;
                panic!("the browser run took longer than {BROWSER_RUN:?}; its output:\n{}", output.join("\n"));
            }
        };
        eprintln!("{line}");
        output.push(line.clone());
        if line == "console-e2e: ready" && !pushed {
            // The console is signed in and watching: now the conflicting change arrives.
            let results = b.push(vec![upsert("products", json!({"id": id}), json!({"price_cents": 280}), 1, now - 60_000, 0)]).await;
            assert_eq!(results[0].status, ChangeStatus::Conflict, "B's older write conflicts: {results:?}");
            assert_eq!(results[0].lost_fields, vec!["price_cents".to_string()], "A's newer clock wins");
            // And a server-side writer broadcasts a message to every screen of the tenant.
            let sent = reqwest::Client::new()
                .post(format!("http://{}/v1/tenants/{TENANT}/broadcast", hub.addr))
                .bearer_auth(SERVICE_TOKEN)
                .json(&json!({"channel": "alerts", "payload": {"level": "warning", "text": BROADCAST_TEXT}}))
                .send()
                .await
                .unwrap();
            assert_eq!(sent.status(), 202, "broadcast accepted");
            stdin.write_all(b"pushed\n").await.unwrap();
            stdin.flush().await.unwrap();
            pushed = true;
        }
        if line == "console-e2e: showing the second conflict" {
            // While the manager looks at it, the price moves on (90 → 95).
            let results = a.push(vec![upsert("products", json!({"id": dismissed_id}), json!({"price_cents": 95}), 3, now_ms(), oat_milk_version)]).await;
            assert_eq!(results[0].status, ChangeStatus::Applied, "{results:?}");
            stdin.write_all(b"moved\n").await.unwrap();
            stdin.flush().await.unwrap();
        }
        if line == "console-e2e: ready for a delete that wins" {
            // A deletes a product that B, offline since its creation, changes: the delete wins.
            let gone = Uuid::new_v4();
            let created = a.push(vec![upsert("products", json!({"id": gone}), product(gone, "Chai", 350), 4, now_ms() - 5_000, 0)]).await;
            let v1 = created[0].seq.expect("created");
            let deleted = a.push(vec![delete("products", json!({"id": gone}), 5, now_ms() - 2_000, v1)]).await;
            assert_eq!(deleted[0].status, ChangeStatus::Applied, "{deleted:?}");
            let results = b.push(vec![upsert("products", json!({"id": gone}), json!({"price_cents": 300}), 3, now_ms(), v1)]).await;
            assert_eq!(results[0].status, ChangeStatus::Conflict, "{results:?}");
            stdin.write_all(b"pushed\n").await.unwrap();
            stdin.flush().await.unwrap();
        }
        if line == "console-e2e: ready for bulk review" {
            // Two more conflicts B loses; then A moves the oat milk's price on, so keeping what
            // that conflict left is refused.
            for (seq, product) in [(4, id), (5, dismissed_id)] {
                let results = b.push(vec![upsert("products", json!({"id": product}), json!({"price_cents": 10 + seq}), seq, now - 60_000, 0)]).await;
                assert_eq!(results[0].status, ChangeStatus::Conflict, "{results:?}");
            }
            let version: i64 = sqlx::query_scalar("select version from synchub.row_versions where tenant_id = $1 and pk = $2")
                .bind(TENANT)
                .bind(json!({"id": dismissed_id}))
                .fetch_one(&hub.db)
                .await
                .unwrap();
            let moved = a.push(vec![upsert("products", json!({"id": dismissed_id}), json!({"price_cents": 96}), 6, now_ms(), version as u64)]).await;
            assert_eq!(moved[0].status, ChangeStatus::Applied, "{moved:?}");
            stdin.write_all(b"pushed\n").await.unwrap();
            stdin.flush().await.unwrap();
        }
        if line == "console-e2e: ready for a second conflict" {
            let results = b.push(vec![upsert("products", json!({"id": dismissed_id}), json!({"price_cents": 70}), 2, now - 60_000, 0)]).await;
            assert_eq!(results[0].status, ChangeStatus::Conflict, "B's older write conflicts: {results:?}");
            stdin.write_all(b"pushed\n").await.unwrap();
            stdin.flush().await.unwrap();
        }
    }
    let status = tokio::time::timeout_at(deadline, node.wait()).await.expect("node exits").expect("node runs");
    let errors = stderr_text.await.unwrap();
    assert!(
        status.success(),
        "the browser run failed ({status}):\n{errors}\nscreenshot: {}\nits output:\n{}",
        screenshot.display(),
        output.join("\n")
    );
    assert!(pushed, "the script never said it was ready");
    assert!(screenshot.exists(), "no screenshot at {}", screenshot.display());
    println!("console screenshot: {}", screenshot.display());

    // Device A, which never saw B's value, receives it as an ordinary delta from the console.
    let delta = tokio::time::timeout(WAIT, a.expect(|f| match f {
        ServerFrame::Delta { deltas, .. } => deltas.iter().find(|d| d.row.as_ref().and_then(|r| r.get("price_cents")) == Some(&json!(280))).cloned(),
        _ => None,
    }))
    .await
    .expect("device A receives the resolution within the wait");
    assert_eq!(delta.key.get("id"), Some(&json!(id.to_string())));
    let origin = delta.origin.clone().unwrap_or_default();
    assert!(origin.starts_with("console:"), "the resolution is written by the console's user, not {origin:?}");
    assert_eq!(delta.old.as_ref().and_then(|o| o.get("price_cents")), Some(&json!(380)));

    let price: i32 = sqlx::query_scalar("select price_cents from public.products where id = $1").bind(id).fetch_one(&hub.db).await.unwrap();
    assert_eq!(price, 280, "the application's table holds the value the manager took");
    hub.shutdown().await;
}

/// The console test's manager, with a token that expires in `secs` seconds.
fn manager_token_for(secs: u64) -> String {
    let claims = json!({"sub": "manager-mia", "role": "Manager", "tenant_id": TENANT, "exp": synchub::auth::unix_now() + secs});
    synchub::auth::mint_hs256(SECRET, &claims)
}
