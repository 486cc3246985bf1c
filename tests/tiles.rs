//! One print across the farm: a print is cut into tiles that the in-process workers share, each
//! a job cached by its own key, and stitched into the PNG one worker makes of the whole.

mod common;

use std::time::Duration;

use common::{TestFarm, kiln, test_config, whole_print as whole};
use hyper::Method;
use kiln_scheduler::scheduler::Live;
use serde_json::{Value, json};

/// The jobs the farm holds that are tiles of an image of `prompt`.
async fn tiles_of(farm: &TestFarm, prompt: &str) -> Vec<Value> {
    let page: Value = farm.client.call(Method::GET, "/v1/jobs?limit=200", None).await.unwrap();
    page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["prompt"] == prompt && j.get("tile").is_some())
        .cloned()
        .collect()
}

/// A farm of one worker, and a 2048² print of `prompt` cut into sixteen tiles (most wait their
/// turn) submitted to it, once its first tile is done: the farm, its config, the request and the
/// print's id.
async fn sixteen_tile_print(prompt: &str, seed: u64) -> (TestFarm, kiln_scheduler::config::FarmConfig, Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.scheduler.workers = 1;
    cfg.scheduler.tiles.tile_pixels = 2048 * 128;
    let farm = TestFarm::start_with(dir, cfg.clone()).await;
    let mut live = farm.sched.subscribe();
    let body = json!({ "prompt": prompt, "seed": seed, "tier": "print", "width": 2048, "height": 2048, "samples": 2 });
    let first = farm.submit(body.clone()).await;
    let id = first["id"].as_str().unwrap().to_owned();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(l) = live.recv().await
                && let Live::Progress { job_id, tiles: Some((done, 16)), .. } = &*l
                && *job_id == id
                && *done >= 1
            {
                return;
            }
        }
    })
    .await
    .expect("a tile finished");
    (farm, cfg, body, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_print_is_cut_into_tiles_the_workers_share_and_stitched_to_the_whole_render() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.scheduler.workers = 3;
    let farm = TestFarm::start_with(dir, cfg).await;

    // Through `kiln submit --wait`: its progress counts the tiles.
    let out = farm.dir.path().join("print.png");
    let run = kiln()
        .args(["submit", "harbour at dusk", "--seed", "11", "--tier", "print", "--width", "384", "--height", "300"])
        .args(["--server", &farm.url, "--token", &farm.token, "--wait", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    // 300 rows, thumbnail factor 2, at least 4 tiles: 76 rows each, the last 72.
    for k in 1..=4 {
        assert!(stderr.contains(&format!("tiles: {k}/4 done")), "{stderr}");
    }
    let png = std::fs::read(&out).unwrap();
    assert!(
        png == whole("harbour at dusk", 11, 384, 300, None),
        "the stitched print is the whole render, byte for byte"
    );

    // Each tile is a job of its own, with its own key, rendered once.
    let tiles = tiles_of(&farm, "harbour at dusk").await;
    let mut rows: Vec<(u64, u64)> =
        tiles.iter().map(|t| (t["tile"]["y0"].as_u64().unwrap(), t["tile"]["rows"].as_u64().unwrap())).collect();
    rows.sort();
    assert_eq!(rows, [(0, 76), (76, 76), (152, 76), (228, 72)]);
    assert!(tiles.iter().all(|t| t["state"] == "succeeded" && t["tier"] == "print"), "{tiles:?}");
    let keys: std::collections::HashSet<&str> = tiles.iter().map(|t| t["cache_key"].as_str().unwrap()).collect();
    assert_eq!(keys.len(), 4);

    // The job's asset and provenance are the whole request's; the provenance lists the tiles
    // and the workers that rendered them.
    let page: Value = farm.client.call(Method::GET, "/v1/jobs?tier=print&limit=200", None).await.unwrap();
    let job = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["prompt"] == "harbour at dusk" && j.get("tile").is_none())
        .cloned()
        .expect("the print's own job");
    assert_eq!((job["state"].as_str(), job["height"].as_u64()), (Some("succeeded"), Some(300)));
    let asset = job["asset"].as_str().unwrap();
    assert_eq!(asset, blake3::hash(&png).to_hex().as_str());
    let p: Value = farm.client.call(Method::GET, &format!("/v1/assets/{asset}/provenance"), None).await.unwrap();
    assert_eq!(p["cache_key"], job["cache_key"]);
    assert_eq!(p["request"]["height"], 300);
    assert!(p["request"].get("tile").is_none(), "{p}");
    let listed = p["tiles"].as_array().unwrap();
    assert_eq!(listed.len(), 4, "{p}");
    for t in listed {
        assert!(t["worker"].as_str().unwrap().starts_with("in-process-"), "{t}");
        assert_eq!(t["backend"], "cpu");
        assert!(tiles.iter().any(|j| j["id"] == t["job"] && j["asset"] == t["asset"]), "{t}");
    }
    assert!(p["stitch"]["seconds"].as_f64().unwrap() > 0.0, "{p}");
    // Its thumbnail is served, made from the stitched rows.
    let thumb = farm.client.bytes(&format!("/v1/assets/{asset}?variant=thumb")).await.unwrap();
    assert_eq!(&thumb[..8], b"\x89PNG\r\n\x1a\n");

    // A repeat is the cached print; the same image at a tier that is not cut up is one job.
    let again = farm
        .submit(json!({ "prompt": "harbour at dusk", "seed": 11, "tier": "print", "width": 384, "height": 300 }))
        .await;
    assert_eq!((again["state"].as_str(), again["asset"].as_str()), (Some("cached"), Some(asset)));
    assert_eq!(tiles_of(&farm, "harbour at dusk").await.len(), 4, "no tile submitted again");
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_print_stops_its_unstarted_tiles_and_a_retry_renders_only_the_rest() {
    let (farm, _, body, id) = sixteen_tile_print("slow tide", 4).await;
    // Cancelled once its first tile is done.
    let cancelled = farm.client.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None).await.unwrap();
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    // The tiles not started are cancelled; the one rendering, if any, finishes.
    let ended =
        |tiles: &[Value]| tiles.iter().all(|t| ["succeeded", "cancelled"].contains(&t["state"].as_str().unwrap()));
    let mut tiles = vec![];
    for _ in 0..200 {
        tiles = tiles_of(&farm, "slow tide").await;
        if tiles.len() == 16 && ended(&tiles) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ended(&tiles), "{tiles:?}");
    let rendered = tiles.iter().filter(|t| t["state"] == "succeeded").count();
    assert!((1..16).contains(&rendered), "{rendered} tiles rendered before the cancel");

    // Again: the tiles rendered before are answered from the cache, the rest rendered.
    let again = farm.submit(body).await;
    let done = farm.wait(again["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let all = tiles_of(&farm, "slow tide").await;
    assert_eq!(all.len(), 32);
    let cached = all.iter().filter(|t| t["state"] == "cached").count();
    assert_eq!(cached, rendered, "each tile rendered before is reused");
    assert_eq!(all.iter().filter(|t| t["state"] == "succeeded").count(), 16, "each tile rendered once in all");
    let png = farm.client.bytes(&format!("/v1/assets/{}", done["asset"].as_str().unwrap())).await.unwrap();
    assert!(png.to_vec() == whole("slow tide", 4, 2048, 2048, Some(2)));
    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tile_that_fails_on_several_workers_quarantines_the_print_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.scheduler.workers = 2;
    cfg.scheduler.broker.quarantine_after_workers = 2;
    cfg.scheduler.retry.max_attempts = 50;
    cfg.scheduler.retry.max_ms = 100;
    let farm = TestFarm::start_with(dir, cfg).await;
    // The asset store's folder becomes a file: every tile's render fails.
    let assets = farm.dir.path().join("assets");
    std::fs::remove_dir_all(&assets).unwrap();
    std::fs::write(&assets, b"in the way").unwrap();
    let j =
        farm.submit(json!({ "prompt": "poison print", "seed": 1, "tier": "print", "width": 512, "height": 512 })).await;
    let done = farm.wait(j["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "failed", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(error.starts_with("tile "), "{error}");
    assert!(error.contains("failed: quarantined: failed on 2 distinct workers (in-process-"), "{error}");
    assert!(error.contains("asset store"), "{error}");
    let quarantined = farm.metric("kiln_render_attempts_total", "outcome=\"quarantined\"").await;
    assert!(quarantined >= 2.0, "a tile and the print: {quarantined}");
    // The other tiles end too: none is left to render for nothing.
    for _ in 0..100 {
        let tiles = tiles_of(&farm, "poison print").await;
        if tiles.iter().all(|t| ["failed", "cancelled"].contains(&t["state"].as_str().unwrap())) {
            farm.stop().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("tiles left open: {:?}", tiles_of(&farm, "poison print").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_print_cut_off_by_a_stop_finishes_after_the_restart_rendering_no_tile_twice() {
    let (farm, cfg, _, id) = sixteen_tile_print("restart tide", 8).await;
    // Stopped with the print half done: it stays running in the store, as after a crash.
    let dir = farm.stop().await;
    let farm = TestFarm::start_with(dir, cfg).await;
    let done = farm.wait(&id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let png = farm.client.bytes(&format!("/v1/assets/{}", done["asset"].as_str().unwrap())).await.unwrap();
    assert!(png.to_vec() == whole("restart tide", 8, 2048, 2048, Some(2)));
    // Every tile rendered once: the second run's tiles found the cache or their earlier jobs.
    let tiles = tiles_of(&farm, "restart tide").await;
    let rendered = tiles.iter().filter(|t| t["state"] == "succeeded" && t.get("follows").is_none()).count();
    let renders = farm.metric("kiln_render_attempts_total", "tier=\"print\",outcome=\"succeeded\"").await;
    assert_eq!(rendered, 16, "{tiles:?}");
    assert!(renders <= 17.0, "16 tiles and the print, each once after the restart: {renders}");
    farm.stop().await;
}
