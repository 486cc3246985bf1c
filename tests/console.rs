//! The console in a real browser: Debian's `chromium`, driven headless over WebDriver
//! (`chromium-driver`'s `chromedriver`, spoken to with the API client: no WebDriver crate),
//! against a `kiln up` with its simulated studio. Sign-in, the approvals by keyboard, the doors
//! (a wrong token, a post without the CSRF token, a client's session), sign-out; and a
//! screenshot of each view at 1280×800 and 390×844 under `target/console-shots/`.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use hyper::Method;
use kiln_common::client::Client;
use kiln_scheduler::auth::Secret;
use serde_json::{Value, json};

/// WebDriver's name for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium session through chromedriver; both end when dropped.
struct Browser {
    _driver: Killed,
    wd: Client,
    session: String,
    base: String,
}

impl Browser {
    async fn start(base: &str) -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let wd = Client::new(&format!("http://127.0.0.1:{port}"), None);
        let until = Instant::now() + Duration::from_secs(20);
        while !wd.call(Method::GET, "/status", None).await.is_ok_and(|v| v["value"]["ready"] == true) {
            assert!(Instant::now() < until, "chromedriver did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // As root (CI) Chromium needs --no-sandbox.
        let args =
            ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800"];
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": { "args": args } } } });
        let s = wd.call(Method::POST, "/session", Some(&caps)).await.expect("a browser session");
        let session = s["value"]["sessionId"].as_str().expect("a session id").to_owned();
        Browser { _driver: Killed(vec![driver]), wd, session, base: base.to_owned() }
    }

    async fn cmd(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let body = body.unwrap_or_else(|| json!({}));
        let body = (method == Method::POST).then_some(&body);
        self.wd.call(method, &path, body).await.unwrap_or_else(|e| panic!("webdriver {path}: {e}"))["value"].clone()
    }

    async fn goto(&self, path: &str) {
        self.cmd(Method::POST, "/url", Some(json!({ "url": format!("{}{path}", self.base) }))).await;
    }

    async fn find(&self, css: &str) -> String {
        let v = self.cmd(Method::POST, "/element", Some(json!({ "using": "css selector", "value": css }))).await;
        v[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {v}")).to_owned()
    }

    /// Sends `action` (`click`, `value`) to the element `css` finds. A live view may swap its
    /// content between the find and the action: the element is found again then.
    async fn act(&self, css: &str, action: &str, body: Value) {
        for _ in 0..5 {
            let e = self.find(css).await;
            let path = format!("/session/{}/element/{e}/{action}", self.session);
            match self.wd.call(Method::POST, &path, Some(&body)).await {
                Ok(_) => return,
                Err(err) if err.to_string().contains("stale element") => continue,
                Err(err) => panic!("webdriver {path}: {err}"),
            }
        }
        panic!("{css} went stale five times over");
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.act(css, "value", json!({ "text": text })).await;
    }

    async fn click(&self, css: &str) {
        self.act(css, "click", json!({})).await;
    }

    /// Presses each key in turn (WebDriver's codes for the arrows: ← U+E012, → U+E014).
    async fn press(&self, keys: &str) {
        let actions: Vec<Value> = keys
            .chars()
            .flat_map(|k| {
                [
                    json!({ "type": "keyDown", "value": k.to_string() }),
                    json!({ "type": "keyUp", "value": k.to_string() }),
                ]
            })
            .collect();
        let body = json!({ "actions": [{ "type": "key", "id": "keyboard", "actions": actions }] });
        self.cmd(Method::POST, "/actions", Some(body)).await;
    }

    /// Runs `script` in the page; its value.
    async fn run(&self, script: &str) -> Value {
        self.cmd(Method::POST, "/execute/sync", Some(json!({ "script": script, "args": [] }))).await
    }

    async fn source(&self) -> String {
        self.cmd(Method::GET, "/source", None).await.as_str().unwrap_or_default().to_owned()
    }

    async fn path(&self) -> String {
        let url = self.cmd(Method::GET, "/url", None).await.as_str().unwrap_or_default().to_owned();
        url.strip_prefix(&self.base).unwrap_or(&url).to_owned()
    }

    /// Waits until the page's source holds `text`.
    async fn wait_for(&self, text: &str) -> String {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let src = self.source().await;
            if src.contains(text) {
                return src;
            }
            assert!(Instant::now() < until, "the page never showed {text:?}:\n{src}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The session cookie, as the browser holds it.
    async fn session_cookie(&self) -> Option<Value> {
        let cookies = self.cmd(Method::GET, "/cookie", None).await;
        cookies.as_array().unwrap().iter().find(|c| c["name"] == "kiln_session").cloned()
    }

    /// A screenshot of the page at `width`×`height` (the viewport, as a phone or a laptop has it).
    async fn shot(&self, name: &str, width: u32, height: u32) {
        let metrics = json!({ "cmd": "Emulation.setDeviceMetricsOverride",
            "params": { "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600 } });
        self.cmd(Method::POST, "/goog/cdp/execute", Some(metrics)).await;
        let png = self.cmd(Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        let dir = shots_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}-{width}x{height}.png")), bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver ends the browser with its session; killing chromedriver alone would not.
        let (wd, path) = (self.wd.clone(), format!("/session/{}", self.session));
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let _ = rt.block_on(wd.send(Method::DELETE, &path, None));
        })
        .join();
    }
}

/// Where the screenshots go: `target/console-shots/` of the build's target dir.
fn shots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("console-shots")
}

/// Screenshots of the page at a laptop's and a phone's size.
async fn shots(b: &Browser, name: &str) {
    b.shot(name, 1280, 800).await;
    b.shot(name, 390, 844).await;
}

fn browser_here() -> bool {
    tool_runs("chromium", "chromium") && tool_runs("chromedriver", "chromium-driver")
}

async fn order_awaiting(c: &Client, seeds: &[u64]) -> String {
    let body = json!({ "plan": "gallery-print", "prompt": "a kiln at dusk", "seeds": seeds });
    let o = c.call(Method::POST, "/v1/orders", Some(&body)).await.unwrap();
    let id = o["id"].as_str().unwrap().to_owned();
    wait_order(c, &id, "awaiting_approval").await;
    id
}

async fn wait_order(c: &Client, id: &str, state: &str) -> Value {
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let o = c.call(Method::GET, &format!("/v1/orders/{id}"), None).await.unwrap();
        if o["state"] == state {
            return o;
        }
        assert!(Instant::now() < until, "order {id} never {state}: {o:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_signs_in_and_approves_by_keyboard_and_the_doors_hold() {
    if !browser_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("kiln.toml");
    // A plan whose photo comes first: of an empty tray it fails, once the studio has printed it
    // works, so the order is retried from its page.
    let plan = r#"
[scheduler.orders]
step_attempts = 1
[[plans]]
name = "photo-first"
[[plans.steps]]
name = "preview"
kind = "render"
tier = "preview"
[[plans.steps]]
name = "photo"
kind = "device"
task = "capture"
"#;
    std::fs::write(&config, small_tiers() + plan).unwrap();
    let (child, url) = spawn_up(&data, &["--config", config.to_str().unwrap()]);
    let _up = Killed(vec![child]);
    let token = operator_token(&data);
    let c = Client::new(&url, Some(Secret::new(token.clone())));
    let b = Browser::start(&url).await;

    // Not signed in: the console sends you to sign in. A wrong token is refused, no session made.
    b.goto("/").await;
    assert_eq!(b.path().await, "/login");
    shots(&b, "login").await;
    b.type_into("#token", "kiln_00000000000000000000000000000000").await;
    b.click("form.login button").await;
    b.wait_for("Unknown, revoked or expired token").await;
    assert!(b.session_cookie().await.is_none(), "no session for a wrong token");

    // The operator signs in: an HttpOnly, SameSite=Strict session cookie; the overview.
    b.type_into("#token", &token).await;
    b.click("form.login button").await;
    b.wait_for("Needs you").await;
    assert_eq!(b.path().await, "/");
    let cookie = b.session_cookie().await.expect("a session cookie");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    shots(&b, "overview").await;

    // An order that photographs the empty tray fails: retried from its page below.
    let body = json!({ "plan": "photo-first", "prompt": "the tray", "seeds": [9] });
    let early = c.call(Method::POST, "/v1/orders", Some(&body)).await.unwrap()["id"].as_str().unwrap().to_owned();
    wait_order(&c, &early, "failed").await;

    // A photo of the printer's empty tray fails: an incident for the operator, resolved below.
    let capture = json!({ "kind": "capture" });
    let task = c.call(Method::POST, "/v1/devices/camera/tasks", Some(&capture)).await.unwrap();
    let task = task["id"].as_str().unwrap().to_owned();
    let until = Instant::now() + Duration::from_secs(30);
    while c.call(Method::GET, &format!("/v1/tasks/{task}"), None).await.unwrap()["state"] != "failed" {
        assert!(Instant::now() < until, "the photo of an empty tray did not fail");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An order of three seeds waits for its approval; the operator chooses option 2 by keyboard.
    let order = order_awaiting(&c, &[3, 4, 5]).await;
    b.goto("/approvals").await;
    b.wait_for(&order).await;
    let src = b.source().await;
    assert_eq!(src.matches("?variant=thumb").count(), 3, "the three previews side by side");
    assert!(src.contains("Approving starts about"), "what approving costs is shown: {src}");
    shots(&b, "approvals").await;
    b.press("\u{E014}a").await;
    b.wait_for("approved option 2").await;

    // Its order page follows it to the gallery without a reload: a mark set on the page now is
    // still there when the page shows the order succeeded.
    b.click(&format!("a[href='/orders/{order}']")).await;
    b.wait_for(r#"data-step="display""#).await;
    b.wait_for(r#"data-events="open""#).await;
    b.run("document.documentElement.dataset.mark = 'kept';").await;
    let src = b.wait_for(r#"<span class="state state-succeeded">succeeded</span></p>"#).await;
    assert!(src.contains(r#"data-mark="kept""#), "the page was reloaded, not updated");
    assert!(src.contains("photo") && src.contains("shown"), "the outputs: the print's photo, the shown asset");
    shots(&b, "order").await;
    let o = wait_order(&c, &order, "succeeded").await;
    assert_eq!(o["approval"]["option"], 2, "{o:#}");
    assert_eq!(o["approval"]["decided_by"], "operator", "{o:#}");
    b.goto("/orders").await;
    b.wait_for(&order).await;
    shots(&b, "orders").await;

    // The order that failed for want of a print is retried from its page, and now succeeds.
    b.goto(&format!("/orders/{early}")).await;
    b.wait_for("Retry the failed step").await;
    b.click("form.retry button").await;
    b.wait_for(r#"<span class="state state-succeeded">succeeded</span></p>"#).await;
    assert_eq!(b.path().await, format!("/orders/{early}"));
    wait_order(&c, &early, "succeeded").await;

    // The jobs view: the order's renders, filtered by tier; one job with its events and asset.
    let job_of = |step: usize| o["steps"][step]["jobs"][0].as_str().unwrap().to_owned();
    let (preview, print) = (job_of(0), job_of(3));
    assert_eq!(o["steps"][3]["name"], "print_render", "{o:#}");
    b.goto("/jobs").await;
    b.wait_for(&print).await;
    shots(&b, "jobs").await;
    b.run("document.getElementById('f-tier').value = 'print';").await;
    b.click("form.filters button").await;
    let src = b.wait_for(r#"value="print" selected"#).await;
    assert!(src.contains(&print) && !src.contains(&preview), "only the print tier's jobs");
    b.click(&format!("a[href='/jobs/{print}']")).await;
    let src = b.wait_for("<h2>Events</h2>").await;
    assert!(src.contains("state-succeeded") && src.contains("?variant=thumb"), "its events and asset: {src}");
    shots(&b, "job").await;
    // The list follows new jobs without a reload.
    b.goto("/jobs").await;
    b.wait_for(&print).await;
    b.wait_for(r#"data-events="open""#).await;
    b.run("document.documentElement.dataset.mark = 'kept';").await;
    let fresh = c.call(Method::POST, "/v1/jobs", Some(&job("a new one", 21, "preview"))).await.unwrap();
    let src = b.wait_for(fresh["id"].as_str().unwrap()).await;
    assert!(src.contains(r#"data-mark="kept""#), "the jobs page was reloaded, not updated");

    // The gallery: found by its prompt's words; the asset's provenance; reproduced here.
    b.goto("/gallery?q=KILN+dusk").await;
    let src = b.wait_for(r#"class="gallery""#).await;
    let chosen = o["outputs"]["shown"].as_str().unwrap().to_owned();
    assert!(src.contains(&chosen), "the shown asset is found by its words: {src}");
    shots(&b, "gallery").await;
    b.goto("/gallery?q=kiln+nowhere").await;
    b.wait_for("No asset's prompt has all those words").await;
    b.goto(&format!("/gallery/{chosen}")).await;
    let src = b.wait_for("Asked by").await;
    assert!(src.contains(&order) && src.contains("kiln reproduce"), "its order and how to reproduce it: {src}");
    shots(&b, "asset").await;
    b.click("form.reproduce button").await;
    b.wait_for("Reproduced on the scheduler").await;
    b.goto("/approvals").await;
    b.wait_for("Nothing waits for a decision").await;
    b.wait_for(r#"data-events="open""#).await;
    b.run("document.documentElement.dataset.mark = 'kept';").await;

    // A post from the session without its CSRF token is refused, form or API; with it, it goes.
    let sid = cookie["value"].as_str().unwrap();
    let other = order_awaiting(&c, &[6]).await;
    // The approvals page shows the new one without a reload.
    let src = b.wait_for(&format!(r#"action="/approvals/{other}.approve""#)).await;
    assert!(src.contains(r#"data-mark="kept""#), "the approvals page was reloaded, not updated");
    let anon = Client::new(&url, None);
    let cookie_header = format!("kiln_session={sid}");
    let form = "decision=approve&option=1";
    let r = anon
        .send_with(
            Method::POST,
            &format!("/approvals/{other}.approve"),
            Some(form.into()),
            &[("cookie", &cookie_header), ("content-type", "application/x-www-form-urlencoded")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let decision = serde_json::to_vec(&json!({ "decision": "approve", "option": 1 })).unwrap();
    let path = format!("/v1/approvals/{other}.approve");
    let r = anon.send_with(Method::POST, &path, Some(decision.clone().into()), &[("cookie", &cookie_header)]).await;
    let r = r.unwrap();
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(wait_order(&c, &other, "awaiting_approval").await["state"], "awaiting_approval");
    let r = anon.send_with(Method::GET, "/v1/approvals", None, &[("cookie", &cookie_header)]).await.unwrap();
    assert_eq!(r.status, 200, "a read needs no CSRF token: {}", String::from_utf8_lossy(&r.body));
    let html = b.source().await;
    let csrf = html.split(r#"name="csrf" value=""#).nth(1).and_then(|r| r.split('"').next()).unwrap().to_owned();
    let with = [("cookie", cookie_header.as_str()), ("x-kiln-csrf", csrf.as_str())];
    let r = anon.send_with(Method::POST, &path, Some(decision.into()), &with).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // An order is cancelled from its page.
    let doomed = order_awaiting(&c, &[7]).await;
    b.goto(&format!("/orders/{doomed}")).await;
    b.click("form.cancel button").await;
    b.wait_for(r#"<span class="state state-cancelled">cancelled</span></p>"#).await;
    assert_eq!(wait_order(&c, &doomed, "cancelled").await["state"], "cancelled");

    // The failed photo's incident is resolved from the incidents view, with a note.
    let until = Instant::now() + Duration::from_secs(30);
    let incident = loop {
        let v = c.call(Method::GET, "/v1/incidents?state=open", None).await.unwrap();
        let found = v["incidents"].as_array().unwrap().iter().find(|i| i["subject"] == task.as_str()).cloned();
        if let Some(i) = found {
            break i["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < until, "no incident for the failed photo {task}: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    b.goto("/incidents").await;
    b.wait_for(&task).await;
    shots(&b, "incidents").await;
    b.type_into(&format!("#n-{incident}"), "the tray was empty").await;
    b.click(&format!("#i-{incident} form.resolve button")).await;
    b.wait_for(&format!("Incident {incident} resolved")).await;
    let i = c.call(Method::GET, &format!("/v1/incidents/{incident}"), None).await.unwrap();
    assert_eq!((i["state"].as_str(), i["note"].as_str()), (Some("resolved"), Some("the tray was empty")), "{i:#}");

    // The fleet: the studio's devices and the farm's workers; a worker drained and resumed.
    b.goto("/fleet").await;
    b.wait_for(r#"data-device="camera""#).await;
    let src = b.wait_for(r#"data-worker="in-process-1""#).await;
    assert!(src.contains("Last telemetry") && src.contains("capture"), "devices with telemetry and tasks: {src}");
    shots(&b, "fleet").await;
    // The devices' changes show without a reload: the lights set to another scene (once the
    // order approved above has set its own, so it does not set them back).
    wait_order(&c, &other, "succeeded").await;
    b.wait_for(r#"data-events="open""#).await;
    b.run("document.documentElement.dataset.mark = 'kept';").await;
    let scene = json!({ "kind": "lights", "params": { "scene": 5, "brightness": 300 } });
    c.call(Method::POST, "/v1/devices/lights/tasks", Some(&scene)).await.unwrap();
    let src = b.wait_for("brightness 300").await;
    assert!(src.contains(r#"data-mark="kept""#), "the fleet page was reloaded, not updated");
    b.type_into("#why-in-process-1", "cleaning the fan").await;
    b.click("tr[data-worker='in-process-1'] form.drain button").await;
    b.wait_for("Worker in-process-1 drained").await;
    let workers = c.call(Method::GET, "/v1/workers", None).await.unwrap();
    let w1 = workers["workers"].as_array().unwrap().iter().find(|w| w["worker_id"] == "in-process-1").unwrap();
    assert_eq!(w1["drained_reason"], "drained by the operator: cleaning the fan", "{workers:#}");
    b.click("tr[data-worker='in-process-1'] form.resume button").await;
    b.wait_for("Worker in-process-1 resumed").await;
    let workers = c.call(Method::GET, "/v1/workers", None).await.unwrap();
    assert!(workers["drained"].as_array().unwrap().is_empty(), "{workers:#}");
    let r = c.send(Method::POST, "/v1/workers/nobody/drain", None).await.unwrap();
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));

    // Sign-out ends the session: its cookie opens nothing afterwards.
    b.goto("/").await;
    b.click("form.signout button").await;
    b.wait_for("API token").await;
    let r = anon.send_with(Method::GET, "/v1/approvals", None, &[("cookie", &cookie_header)]).await.unwrap();
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));

    // A client's session: its own jobs, not the farm's, and no approvals.
    let made = c.call(Method::POST, "/v1/tokens", Some(&json!({ "name": "ana", "role": "client" }))).await.unwrap();
    let ana = Client::new(&url, Some(Secret::new(made["token"].as_str().unwrap().to_owned())));
    let mine = ana.call(Method::POST, "/v1/jobs", Some(&job("ana's piece", 11, "preview"))).await.unwrap();
    let theirs = c.call(Method::POST, "/v1/jobs", Some(&job("the studio's piece", 12, "preview"))).await.unwrap();
    b.type_into("#token", made["token"].as_str().unwrap()).await;
    b.click("form.login button").await;
    let src = b.wait_for("Your latest jobs").await;
    assert!(src.contains(mine["id"].as_str().unwrap()), "the client sees its own job");
    assert!(!src.contains(theirs["id"].as_str().unwrap()), "and not the operator's");
    assert!(!src.contains("Needs you") && !src.contains(r#"href="/approvals""#), "nor the farm's figures");
    assert!(!src.contains(r#"href="/fleet""#), "no fleet for a client");
    b.goto("/approvals").await;
    b.wait_for("the operator's to decide").await;
    b.goto("/fleet").await;
    b.wait_for("The fleet is the operator's").await;
    b.goto("/jobs").await;
    let src = b.wait_for(mine["id"].as_str().unwrap()).await;
    assert!(!src.contains(theirs["id"].as_str().unwrap()), "a client's jobs view lists its own");
    b.goto("/gallery?q=kiln").await;
    let src = b.wait_for("Prompt words").await;
    assert!(!src.contains(&chosen), "nor the studio's assets: {src}");
    b.goto(&format!("/gallery/{chosen}")).await;
    b.wait_for(&format!("no asset {chosen}")).await;
    b.goto(&format!("/orders/{order}")).await;
    b.wait_for(&format!("No order {order}")).await;
}
