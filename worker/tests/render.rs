//! End-to-end tests of the render engine: determinism, backend agreement, tiling, the cache,
//! provenance and the command line's errors.

use std::process::Command;

use kiln_protocol::{RenderRequest, Tier, TierLimits, Tile};
use kiln_worker::config::{BackendChoice, WorkerConfig};
use kiln_worker::gpu::gpu_for_tests;
use kiln_worker::render::{Backend, Engine, ModelPath, render_to, stitch};
use kiln_worker::worker::Worker;

fn req(prompt: &str, seed: u64, tier: Tier, side: u32, samples: Option<u32>) -> RenderRequest {
    RenderRequest::resolve("cppn", prompt, seed, tier, Some(side), None, samples, &TierLimits::default()).unwrap()
}

fn cpu() -> Engine {
    Engine { backend: Backend::Cpu { threads: 2 }, path: ModelPath::Fused, band_samples: 1 << 20 }
}

fn wgpu() -> Option<Engine> {
    gpu_for_tests().map(|g| Engine { backend: Backend::Wgpu(g), path: ModelPath::Fused, band_samples: 1 << 20 })
}

fn png(engine: &Engine, r: &RenderRequest) -> Vec<u8> {
    let mut out = Vec::new();
    render_to(engine, r, &mut out, &mut |_| {}).unwrap();
    out
}

/// Decodes an RGB8 PNG to (width, height, bytes).
fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// (max channel difference, PSNR in dB, mean absolute difference).
fn compare(a: &[u8], b: &[u8]) -> (u8, f64, f64) {
    assert_eq!(a.len(), b.len());
    let max = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
    let mse = a.iter().zip(b).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum::<f64>() / a.len() as f64;
    let mad = a.iter().zip(b).map(|(x, y)| f64::from(x.abs_diff(*y))).sum::<f64>() / a.len() as f64;
    let psnr = if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0 * 255.0 / mse).log10() };
    (max, psnr, mad)
}

#[test]
fn the_same_request_twice_gives_byte_identical_pngs() {
    let r = req("ember kaleidoscope", 1, Tier::Preview, 160, None);
    assert_eq!(png(&cpu(), &r), png(&cpu(), &r), "cpu");
    if let Some(g) = wgpu() {
        assert_eq!(png(&g, &r), png(&g, &r), "wgpu");
    }
}

#[test]
fn wgpu_and_cpu_agree_within_tolerance() {
    let Some(g) = wgpu() else { return };
    // Stated tolerance: at most 2 levels in any channel, PSNR at least 45 dB.
    for r in [
        req("neon busy mirror", 4, Tier::Preview, 128, None),
        req("ocean calm", 2, Tier::Final, 96, Some(3)),
        req("dusk", 5, Tier::Print, 100, None),
    ] {
        let (_, _, a) = decode(&png(&cpu(), &r));
        let (_, _, b) = decode(&png(&g, &r));
        let (max, psnr, _) = compare(&a, &b);
        assert!(max <= 2 && psnr >= 45.0, "{:?}: max channel difference {max}, PSNR {psnr:.1} dB", r.tier);
    }
}

#[test]
fn different_seeds_and_prompts_differ_visibly() {
    let base = decode(&png(&cpu(), &req("forest rock", 1, Tier::Final, 96, Some(1)))).2;
    let other_seed = decode(&png(&cpu(), &req("forest rock", 2, Tier::Final, 96, Some(1)))).2;
    let other_prompt = decode(&png(&cpu(), &req("forest pool", 1, Tier::Final, 96, Some(1)))).2;
    let other_palette = decode(&png(&cpu(), &req("ember rock", 1, Tier::Final, 96, Some(1)))).2;
    for (what, img) in [("seed", other_seed), ("prompt", other_prompt), ("palette word", other_palette)] {
        let (_, _, mad) = compare(&base, &img);
        assert!(mad > 8.0, "another {what} changed the image by only {mad:.1} levels on average");
    }
}

#[test]
fn banded_and_whole_renders_are_bit_identical() {
    let r = req("quad desert", 3, Tier::Final, 120, Some(2));
    let mut engines = vec![cpu()];
    engines.extend(wgpu());
    for mut e in engines {
        e.band_samples = 1 << 24;
        let whole = png(&e, &r);
        e.band_samples = 4096; // many small bands
        let banded = png(&e, &r);
        assert_eq!(whole, banded, "{}", e.backend.name());
    }
}

#[test]
fn tiers_are_the_same_artwork_at_another_resolution() {
    // A final render box-downsampled to the preview size looks like the preview (minus watermark).
    let fin = decode(&png(&cpu(), &req("dusk quad", 9, Tier::Final, 256, Some(2)))).2;
    let print = decode(&png(&cpu(), &req("dusk quad", 9, Tier::Print, 128, Some(1)))).2;
    let mut down = vec![0u8; 128 * 128 * 3];
    for y in 0..128 {
        for x in 0..128 {
            for c in 0..3 {
                let s: u32 = [(0, 0), (1, 0), (0, 1), (1, 1)]
                    .iter()
                    .map(|(dx, dy)| u32::from(fin[((2 * y + dy) * 256 + 2 * x + dx) * 3 + c]))
                    .sum();
                down[(y * 128 + x) * 3 + c] = ((s + 2) / 4) as u8;
            }
        }
    }
    let (_, psnr, _) = compare(&down, &print);
    assert!(psnr > 25.0, "final downsampled vs print at the same size: PSNR {psnr:.1} dB");
}

#[test]
fn the_burn_path_agrees_with_the_fused_path() {
    let r = req("mirror forest", 6, Tier::Preview, 64, None);
    let fused = decode(&png(&cpu(), &r)).2;
    let mut burn_cpu = cpu();
    burn_cpu.path = ModelPath::Burn;
    let (max, _, _) = compare(&fused, &decode(&png(&burn_cpu, &r)).2);
    assert!(max <= 1, "burn flex vs fused cpu: {max} levels");
    if let Some(mut g) = wgpu() {
        g.path = ModelPath::Burn;
        let (max, _, _) = compare(&fused, &decode(&png(&g, &r)).2);
        assert!(max <= 2, "burn wgpu vs fused cpu: {max} levels");
    }
}

#[test]
fn a_thumbnail_made_from_the_png_matches_the_renders_own() {
    // The scheduler makes an uploaded asset's thumbnail from its PNG: what it serves must be the
    // thumbnail the render made (from unquantised light) within a code or two, at its size.
    let dir = tempfile::tempdir().unwrap();
    for (w, h) in [(600, 600), (1000, 397)] {
        let limits = TierLimits::default();
        let r = RenderRequest::resolve("cppn", "ember kaleidoscope", 7, Tier::Final, Some(w), Some(h), None, &limits)
            .unwrap();
        let mut out = Vec::new();
        let (thumb, _) = render_to(&cpu(), &r, &mut out, &mut |_| {}).unwrap();
        let path = dir.path().join("a.png");
        std::fs::write(&path, &out).unwrap();
        let made = kiln_worker::render::thumbnail_of_png(&path).unwrap().expect("larger than a thumbnail");
        let (want, got) = (decode(&thumb.unwrap()), decode(&made));
        assert_eq!((got.0, got.1), (want.0, want.1), "{w}x{h}");
        let (max, psnr, _) = compare(&want.2, &got.2);
        assert!(max <= 3 && psnr > 45.0, "{w}x{h}: max {max}, PSNR {psnr:.1} dB");
    }
    // An image no larger than a thumbnail is its own; bytes that are no PNG are refused.
    let small = dir.path().join("small.png");
    std::fs::write(&small, png(&cpu(), &req("ember", 1, Tier::Preview, 128, None))).unwrap();
    assert_eq!(kiln_worker::render::thumbnail_of_png(&small), Ok(None));
    std::fs::write(&small, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let e = kiln_worker::render::thumbnail_of_png(&small).unwrap_err();
    assert!(e.starts_with("not a readable PNG"), "{e}");
}

fn config(dir: &std::path::Path) -> WorkerConfig {
    WorkerConfig { data_dir: dir.to_path_buf(), backend: BackendChoice::Cpu, ..WorkerConfig::default() }
}

/// The files in the store's key index (none before its first).
fn key_index_entries(dir: &std::path::Path) -> usize {
    let Ok(shards) = std::fs::read_dir(dir.join("keys")) else { return 0 };
    shards.map(|s| std::fs::read_dir(s.unwrap().path()).unwrap().count()).sum()
}

#[test]
fn a_render_under_64_by_64_is_cached_in_memory_but_not_indexed_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (tiny, edge) = (req("ember tide", 12, Tier::Preview, 16, None), req("ember tide", 12, Tier::Preview, 64, None));
    let w = Worker::new(&cfg, Backend::Cpu { threads: 2 }).unwrap();
    let first = w.render(&tiny, &mut |_| {}).unwrap();
    assert!(!first.cache_hit);
    assert!(w.render(&tiny, &mut |_| {}).unwrap().cache_hit, "a repeat within the process is a hit");
    assert_eq!(key_index_entries(dir.path()), 0, "16x16 is cheaper to render again than to index");
    w.render(&edge, &mut |_| {}).unwrap();
    assert_eq!(key_index_entries(dir.path()), 1, "64x64 is indexed");
    drop(w);
    // After a restart the tiny one renders again, to the same asset; the 64×64 one is a hit.
    let w = Worker::new(&cfg, Backend::Cpu { threads: 2 }).unwrap();
    let again = w.render(&tiny, &mut |_| {}).unwrap();
    assert!(!again.cache_hit);
    assert_eq!(again.asset, first.asset);
    assert!(w.render(&edge, &mut |_| {}).unwrap().cache_hit);
    assert_eq!((w.metrics.cache_misses.get(), w.metrics.cache_hits.get()), (1, 1));
}

#[test]
fn a_repeated_request_is_served_from_the_cache_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let r = req("ember tide", 12, Tier::Preview, 96, None);
    let w = Worker::new(&cfg, Backend::Cpu { threads: 2 }).unwrap();
    let first = w.render(&r, &mut |_| {}).unwrap();
    assert!(!first.cache_hit);
    let bytes = std::fs::read(&first.path).unwrap();
    assert_eq!(blake3::hash(&bytes).to_hex().as_str(), first.asset, "the asset is named by the BLAKE3 of its bytes");
    let second = w.render(&r, &mut |_| {}).unwrap();
    assert!(second.cache_hit);
    assert_eq!(second.asset, first.asset);
    assert_eq!((w.metrics.cache_misses.get(), w.metrics.cache_hits.get()), (1, 1));
    assert_eq!(w.metrics.pixels.with_label_values(&["preview"]).get(), 96 * 96, "the hit rendered nothing");
    assert!(w.metrics.encode().contains("kiln_cache_hits_total 1"));
    drop(w);
    // A new worker over the same data dir: still a hit, nothing rendered.
    let w = Worker::new(&cfg, Backend::Cpu { threads: 2 }).unwrap();
    let third = w.render(&r, &mut |_| {}).unwrap();
    assert!(third.cache_hit);
    assert_eq!(third.asset, first.asset);
    assert_eq!(w.metrics.cache_misses.get(), 0);
    // The provenance names what made it.
    let prov: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.store().provenance_path(&first.asset)).unwrap()).unwrap();
    assert_eq!(prov["asset"], first.asset.as_str());
    assert_eq!(prov["cache_key"], first.key.to_string().as_str());
    assert_eq!(prov["backend"], "cpu");
    assert_eq!(prov["request"]["seed"], 12);
    assert!(prov["timings"]["total_seconds"].as_f64().unwrap() > 0.0);
    assert!(prov["model"]["version"].as_str().unwrap().len() == 16);
    // 96×96 is no larger than a thumbnail: it is its own, with no file of its own.
    assert!(!w.store().thumb_path(&first.asset).exists());
    assert_eq!(w.store().thumbnail(&first.asset), Some(first.path.clone()));
    assert_eq!(prov["thumbnail"], first.asset.as_str());
}

/// The provenance a render handed back: a JSON object with every part of the record.
fn provenance_of(r: &kiln_worker::worker::Rendered) -> serde_json::Value {
    let text = r.provenance.as_deref().expect("a new render hands its provenance back");
    let prov: serde_json::Value = serde_json::from_str(text).expect("the provenance is JSON");
    let names: Vec<&str> = prov.as_object().expect("an object").keys().map(String::as_str).collect();
    let all = [
        "asset",
        "backend",
        "cache_key",
        "created_unix",
        "device",
        "host",
        "key_input",
        "kiln_version",
        "model",
        "post_chain_version",
        "request",
        "thumbnail",
        "timings",
    ];
    assert_eq!(names, all, "{text}");
    assert_eq!(prov["model"]["id"], "cppn", "{text}");
    prov
}

#[test]
fn a_worker_whose_caller_keeps_its_records_hands_back_each_provenance_and_keeps_no_index() {
    let dir = tempfile::tempdir().unwrap();
    let w = Worker::new(&config(dir.path()), Backend::Cpu { threads: 2 }).unwrap().records_kept_by_caller();
    let r = req("kept elsewhere", 6, Tier::Preview, 96, None);
    let (first, second) = (w.render(&r, &mut |_| {}).unwrap(), w.render(&r, &mut |_| {}).unwrap());
    // Repeats are its caller's to answer: the same request renders again, to the same asset.
    assert!(!first.cache_hit && !second.cache_hit);
    assert_eq!(second.asset, first.asset);
    assert_eq!(std::fs::read(&first.path).unwrap().len() as u64, first.bytes);
    for rendered in [&first, &second] {
        let prov = provenance_of(rendered);
        assert_eq!((&prov["asset"], &prov["request"]["seed"]), (&first.asset.as_str().into(), &6.into()));
        assert_eq!(prov["cache_key"], first.key.to_string().as_str());
    }
    assert!(!w.store().provenance_path(&first.asset).exists(), "no provenance file");
    assert_eq!(key_index_entries(dir.path()), 0, "no key index, though 96×96 is indexed by a worker on its own");
}

#[test]
fn a_small_render_can_be_held_in_memory_instead_of_stored_and_is_the_same_asset() {
    let dir = tempfile::tempdir().unwrap();
    let w = Worker::new(&config(dir.path()), Backend::Cpu { threads: 2 }).unwrap();
    let small = req("held ember", 3, Tier::Preview, 24, None);
    let held = w.render_holding(&small, &mut |_| {}, 32 << 10).unwrap();
    let png = held.png.as_deref().expect("a 24×24 PNG is held");
    assert_eq!((blake3::hash(png).to_hex().as_str(), held.bytes), (held.asset.as_str(), png.len() as u64));
    assert!(!w.store().contains(&held.asset) && !w.store().provenance_path(&held.asset).exists(), "nothing stored");
    let prov = provenance_of(&held);
    assert_eq!((&prov["asset"], &prov["request"]["seed"]), (&held.asset.as_str().into(), &3.into()));
    // Not cached either: the same request renders again, stored this time, to the same bytes.
    let stored = w.render(&small, &mut |_| {}).unwrap();
    assert!(!stored.cache_hit && stored.png.is_none());
    assert_eq!((stored.asset.as_str(), std::fs::read(&stored.path).unwrap()), (held.asset.as_str(), png.to_vec()));
    // Larger than `hold`, or not its own thumbnail: stored as ever.
    let tiny_hold = w.render_holding(&req("held ember", 4, Tier::Preview, 24, None), &mut |_| {}, 16).unwrap();
    assert!(tiny_hold.png.is_none() && w.store().contains(&tiny_hold.asset));
    let large = w.render_holding(&req("held ember", 5, Tier::Preview, 300, None), &mut |_| {}, 64 << 10).unwrap();
    assert!(large.png.is_none() && w.store().contains(&large.asset));
    assert!(w.store().thumb_path(&large.asset).exists());
}

fn cli(args: &[&str], data: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-worker"))
        .args(args)
        .env("KILN_DATA_DIR", data)
        .env("KILN_BACKEND", "cpu")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn the_cli_renders_and_reports_hash_key_and_cache_state() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.png");
    let o = out.to_str().unwrap();
    let (ok, stdout, stderr) = cli(
        &["render", "--prompt", "Ocean  Calm", "--seed", "3", "--tier", "preview", "--width", "64", "--out", o],
        dir.path(),
    );
    assert!(ok, "{stderr}");
    let hash = blake3::hash(&std::fs::read(&out).unwrap()).to_hex().to_string();
    assert!(stdout.contains(&format!("asset {hash}")), "{stdout}");
    assert!(stdout.contains("cache miss") && stdout.contains("key   "), "{stdout}");
    // The same request, spelled differently: a hit. Its thumbnail is itself (64 px).
    let thumb = dir.path().join("a.thumb.png");
    let t = thumb.to_str().unwrap();
    let (ok, stdout, _) = cli(
        &["render", "--prompt", "ocean calm", "--seed", "3", "--width", "64", "--out", o, "--thumb", t],
        dir.path(),
    );
    assert!(ok && stdout.contains("cache hit") && stdout.contains(&hash), "{stdout}");
    assert_eq!(std::fs::read(&thumb).unwrap(), std::fs::read(&out).unwrap());
    // A larger image has a thumbnail of its own, at most 256 px on its long side.
    let (ok, _, stderr) =
        cli(&["render", "--prompt", "ocean", "--seed", "3", "--width", "300", "--out", o, "--thumb", t], dir.path());
    assert!(ok, "{stderr}");
    let (w, h, _) = decode(&std::fs::read(&thumb).unwrap());
    assert_eq!((w, h), (150, 150));
}

#[test]
fn bad_input_gets_a_clear_error_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let o = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--width", "0"], "width: must be at least 1"),
        (vec!["--width", "99999", "--tier", "final"], "tiers.final.max_side"),
        (vec!["--tier", "poster"], "unknown tier"),
        (vec!["--backend", "cuda"], "invalid value 'cuda'"),
        (vec!["--samples", "9"], "samples"),
        (vec!["--width", "-3"], "--width"),
    ];
    for (extra, expect) in cases {
        let mut args = vec!["render", "--prompt", "x", "--seed", "1", "--out", o];
        args.extend(extra.iter());
        let (ok, _, stderr) = cli(&args, dir.path());
        assert!(!ok, "{extra:?} succeeded");
        assert!(stderr.contains(expect), "{extra:?}: expected {expect:?} in {stderr}");
    }
    let (ok, _, stderr) =
        cli(&["render", "--prompt", "x", "--seed", "1", "--width", "8", "--out", "/nonexistent/dir/x.png"], dir.path());
    assert!(!ok && stderr.contains("/nonexistent/dir") && stderr.contains("does not exist"), "{stderr}");
    let (ok, _, stderr) = cli(
        &["render", "--prompt", "x", "--seed", "1", "--width", "8", "--out", dir.path().to_str().unwrap()],
        dir.path(),
    );
    assert!(!ok && stderr.contains("is a directory"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn a_preview_and_a_final_of_the_same_size_do_not_share_a_cache_entry() {
    let dir = tempfile::tempdir().unwrap();
    let w = Worker::new(&config(dir.path()), Backend::Cpu { threads: 2 }).unwrap();
    let preview = req("ember", 3, Tier::Preview, 64, Some(1));
    let fin = req("ember", 3, Tier::Final, 64, Some(1));
    assert_ne!(w.key(&preview), w.key(&fin), "watermarked and unmarked share a key");
    let a = w.render(&preview, &mut |_| {}).unwrap();
    let b = w.render(&fin, &mut |_| {}).unwrap();
    assert!(!b.cache_hit, "the final was served the watermarked preview");
    assert_ne!(a.asset, b.asset);
    // The tier's config decides the post chain: a preview without watermark is the final's pixels.
    let mut limits = TierLimits::default();
    limits.preview.watermark = false;
    let plain = RenderRequest::resolve("cppn", "ember", 3, Tier::Preview, Some(64), None, Some(1), &limits).unwrap();
    assert_eq!(png(&cpu(), &plain), png(&cpu(), &fin));
    assert_eq!(w.key(&plain), w.key(&fin));
}

/// Renders `r` in the tiles `rows` (rows each, the last what is left) and stitches them.
fn stitched(engine: &Engine, r: &RenderRequest, rows: u32) -> (Vec<u8>, Option<Vec<u8>>) {
    let tiles: Vec<(Tile, std::io::Cursor<Vec<u8>>)> = (0..r.height)
        .step_by(rows as usize)
        .map(|y0| {
            let t = Tile { y0, rows: rows.min(r.height - y0) };
            (t, std::io::Cursor::new(png(engine, &r.tile(t))))
        })
        .collect();
    let mut out = Vec::new();
    let (thumb, stats) = stitch(r.width, r.height, tiles, &mut out).unwrap();
    assert_eq!(stats.tiles, r.height.div_ceil(rows));
    (out, thumb)
}

#[test]
fn tiles_stitched_in_order_are_the_whole_render_byte_for_byte() {
    // Print (dither), preview (watermark) and a supersampled final; bands that do not line up
    // with the tiles; an image that is its own thumbnail and ones that are not.
    let mut engines = vec![("cpu", cpu()), ("cpu, small bands", Engine { band_samples: 3000, ..cpu() })];
    engines.extend(wgpu().map(|g| ("wgpu", g)));
    for (name, engine) in &engines {
        for (r, rows) in [
            (req("harbour dusk", 3, Tier::Print, 600, None), 129),
            (RenderRequest { height: 300, ..req("neon", 9, Tier::Preview, 520, None) }, 63),
            (req("ocean calm", 2, Tier::Final, 200, Some(2)), 50),
        ] {
            let whole = png(engine, &r);
            let (joined, thumb) = stitched(engine, &r, rows);
            assert!(joined == whole, "{name}: {:?} {}×{} in tiles of {rows} rows", r.tier, r.width, r.height);
            // The thumbnail is the one made from the whole PNG.
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("whole.png"), &whole).unwrap();
            let from_png = kiln_worker::render::thumbnail_of_png(&dir.path().join("whole.png")).unwrap();
            assert_eq!(thumb, from_png, "{name}");
        }
    }
}

#[test]
fn a_tile_outside_its_image_or_off_the_thumbnail_grid_is_refused_and_tiles_must_cover_it() {
    let r = req("dusk", 5, Tier::Print, 600, None);
    let mut out = Vec::new();
    for (t, why) in [
        (Tile { y0: 512, rows: 100 }, "not within the image's 600 rows"),
        (Tile { y0: 0, rows: 0 }, "or none"),
        (Tile { y0: 5, rows: 10 }, "not a multiple of the thumbnail factor 3"),
    ] {
        let e = render_to(&cpu(), &r.tile(t), &mut out, &mut |_| {}).unwrap_err().to_string();
        assert!(e.starts_with("tile: ") && e.contains(why), "{t:?}: {e}");
    }
    // A gap, a tile of the wrong size, and tiles that stop short are each named.
    let tile = |y0, rows| (Tile { y0, rows }, std::io::Cursor::new(png(&cpu(), &r.tile(Tile { y0, rows }))));
    let e = stitch(600, 600, [tile(0, 300), tile(330, 270)], Vec::new()).unwrap_err();
    assert!(e.contains("tile at rows 330..600: the tiles before it end at row 300"), "{e}");
    let (t, png) = tile(300, 300);
    let e = stitch(600, 600, [tile(0, 300), (Tile { rows: 150, ..t }, png)], Vec::new()).unwrap_err();
    assert!(e.contains("a 600×300 PNG") && e.contains("it must be 600×150"), "{e}");
    let e = stitch(600, 600, [tile(0, 300)], Vec::new()).unwrap_err();
    assert_eq!(e, "the tiles end at row 300 of 600");
}
