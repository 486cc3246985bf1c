//! The wgpu side: one device and queue, the compute pipelines over `shaders/`, and the per-band
//! pass that runs the fused CPPN kernel and the post chain and reads back 8-bit pixels.

use std::sync::{Arc, Mutex};

use bytemuck::Pod;
use wgpu::util::DeviceExt;

use crate::engine::EngineError;
use crate::engine::cppn::{Cppn, SampleTile};
use crate::post::{GLYPHS, PostParams};
use crate::shaders::pipeline_source;

const WORKGROUP: u32 = 64;

/// The `CppnParams` uniform of `shaders/cppn.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CppnParams {
    tile: [u32; 4],
    grid: [u32; 4],
    acts: [u32; 4],
    style: [f32; 4],
    latent: [f32; 8],
}

/// The compute pipelines, compiled once per device.
#[derive(Debug)]
pub struct Pipelines {
    /// Fused CPPN.
    pub cppn: wgpu::ComputePipeline,
    /// Palette tone map.
    pub tone: wgpu::ComputePipeline,
    /// Supersample resolve.
    pub resolve: wgpu::ComputePipeline,
    /// Preview watermark.
    pub watermark: wgpu::ComputePipeline,
    /// sRGB quantise and dither.
    pub quantize: wgpu::ComputePipeline,
    /// Thumbnail downsample.
    pub thumbnail: wgpu::ComputePipeline,
}

/// A wgpu device ready to render.
#[derive(Debug)]
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    /// The compiled pipelines.
    pub pipelines: Pipelines,
    glyphs: wgpu::Buffer,
    error: Arc<Mutex<Option<String>>>,
    /// NVML for this GPU, opened at the first ask (`None`: not an NVIDIA GPU, or no driver library).
    nvml: std::sync::OnceLock<Option<crate::gpu_usage::Nvml>>,
}

fn backend_err(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Backend(format!("{what}: {e}"))
}

impl Gpu {
    /// Opens the best adapter (a GPU where there is one; lavapipe's software Vulkan otherwise)
    /// and compiles every pipeline.
    pub fn new() -> Result<Gpu, EngineError> {
        Gpu::with_cppn(None)
    }

    /// As `new`, with `cppn` (WGSL with the bindings of shaders/cppn.wgsl) in place of the built-in
    /// fused kernel where given: for `kiln-worker bench --cppn-wgsl`, which times other versions of
    /// the kernel and stores nothing they render.
    pub fn with_cppn(cppn: Option<&str>) -> Result<Gpu, EngineError> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            ..Default::default()
        }))
        .map_err(|_| EngineError::NoAdapter)?;
        let info = adapter.get_info();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("kiln"),
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| backend_err("cannot open the wgpu device", e))?;
        let error = Arc::new(Mutex::new(None));
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            tracing::error!(error = %e, "wgpu error");
            if let Ok(mut slot) = sink.lock() {
                slot.get_or_insert(e.to_string());
            }
        }));
        let pipeline = |name: &str| -> Result<wgpu::ComputePipeline, EngineError> {
            let src = match (name, cppn) {
                ("cppn", Some(given)) => given.to_owned(),
                _ => pipeline_source(name).unwrap_or_default(),
            };
            let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            });
            let p = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
            match pollster::block_on(scope.pop()) {
                Some(e) => Err(backend_err(&format!("shaders/{name}.wgsl does not compile"), e)),
                None => Ok(p),
            }
        };
        let pipelines = Pipelines {
            cppn: pipeline("cppn")?,
            tone: pipeline("tone")?,
            resolve: pipeline("resolve")?,
            watermark: pipeline("watermark")?,
            quantize: pipeline("quantize")?,
            thumbnail: pipeline("thumbnail")?,
        };
        let glyphs = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("glyphs"),
            contents: bytemuck::cast_slice(&GLYPHS),
            usage: wgpu::BufferUsages::STORAGE,
        });
        Ok(Gpu { device, queue, info, pipelines, glyphs, error, nvml: Default::default() })
    }

    /// The GPU's memory and load as its driver says, where it does: NVML on an NVIDIA GPU; `None`
    /// elsewhere (software adapters, other vendors), where the adapter's name is all there is.
    pub fn usage(&self) -> Option<crate::gpu_usage::GpuUsage> {
        let nvml = self.nvml.get_or_init(|| {
            if self.info.vendor != crate::gpu_usage::NVIDIA {
                return None;
            }
            crate::gpu_usage::Nvml::open(&self.info.name, &self.info.device_pci_bus_id)
                .map_err(|e| tracing::info!(error = e, "no GPU memory or load figures"))
                .ok()
        });
        let usage = nvml.as_ref()?.usage();
        usage.map_err(|e| tracing::debug!(error = e, "cannot read the GPU's memory and load")).ok()
    }

    /// The adapter's name, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)" or "NVIDIA H100".
    pub fn adapter_name(&self) -> &str {
        &self.info.name
    }

    /// The driver and its version as the adapter reports them, e.g. "NVIDIA 550.54.14".
    pub fn driver(&self) -> String {
        match (self.info.driver.trim(), self.info.driver_info.trim()) {
            ("", "") => "not reported by the adapter".into(),
            (d, "") | ("", d) => d.to_owned(),
            (d, i) => format!("{d} {i}"),
        }
    }

    /// Whether the adapter is a software rasteriser (lavapipe, llvmpipe, WARP).
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The adapter's graphics API and device type, e.g. "Vulkan Cpu".
    pub fn adapter_kind(&self) -> String {
        format!("{:?} {:?}", self.info.backend, self.info.device_type)
    }

    /// A storage buffer of `bytes` (at least 4), readable back.
    pub fn storage(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// A storage buffer holding `data`.
    pub fn storage_init<T: Pod>(&self, label: &str, data: &[T]) -> wgpu::Buffer {
        let b = self.storage(label, std::mem::size_of_val(data) as u64);
        self.queue.write_buffer(&b, 0, bytemuck::cast_slice(data));
        b
    }

    /// A uniform buffer for one `T`.
    pub fn uniform<T: Pod>(&self, label: &str) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: std::mem::size_of::<T>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Writes `value` into a buffer (ordered before the next submission).
    pub fn write<T: Pod>(&self, buffer: &wgpu::Buffer, value: &[T]) {
        self.queue.write_buffer(buffer, 0, bytemuck::cast_slice(value));
    }

    /// The glyph table of the watermark.
    pub fn glyphs(&self) -> &wgpu::Buffer {
        &self.glyphs
    }

    /// Records one dispatch of `pipeline` over `threads` invocations; binding i is `buffers[i]`.
    pub fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        pipeline: &wgpu::ComputePipeline,
        buffers: &[&wgpu::Buffer],
        threads: u32,
    ) {
        if threads == 0 {
            return;
        }
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
            .collect();
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let groups = threads.div_ceil(WORKGROUP);
        let gx = groups.min(32_768);
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(gx, groups.div_ceil(gx), 1);
    }

    /// A new command encoder.
    pub fn encoder(&self) -> wgpu::CommandEncoder {
        self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default())
    }

    /// Submits `enc`, then copies the first `elems[i]` elements of each `reads[i]` back to the CPU.
    pub fn submit_and_read<T: Pod>(
        &self,
        mut enc: wgpu::CommandEncoder,
        reads: &[(&wgpu::Buffer, usize)],
    ) -> Result<Vec<Vec<T>>, EngineError> {
        let mut staging = Vec::new();
        for (buf, elems) in reads {
            let bytes = ((elems * std::mem::size_of::<T>()) as u64).max(4).next_multiple_of(4);
            let s = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            enc.copy_buffer_to_buffer(buf, 0, &s, 0, bytes);
            staging.push((s, *elems));
        }
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        for (s, _) in &staging {
            let tx = tx.clone();
            s.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
        }
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| backend_err("waiting for the GPU", e))?;
        for _ in &staging {
            rx.recv().map_err(|e| backend_err("readback", e))?.map_err(|e| backend_err("readback", e))?;
        }
        if let Some(e) = self.error.lock().ok().and_then(|mut e| e.take()) {
            return Err(EngineError::Backend(e));
        }
        let mut out = Vec::with_capacity(staging.len());
        for (s, elems) in staging {
            let view = s.slice(..).get_mapped_range().map_err(|e| backend_err("readback", e))?;
            let all: &[T] = bytemuck::cast_slice(&view);
            out.push(all[..elems].to_vec());
        }
        Ok(out)
    }
}

/// Where a band's samples come from.
pub enum Samples<'a> {
    /// The fused CPPN kernel on this device.
    Fused,
    /// Samples computed elsewhere (the burn path): 3 floats per sample, uploaded.
    Given(&'a [f32]),
}

/// The buffers of one render, sized for its largest band and reused for every band.
pub struct BandRenderer<'g> {
    gpu: &'g Gpu,
    weights: wgpu::Buffer,
    cppn: wgpu::Buffer,
    post: wgpu::Buffer,
    samples: wgpu::Buffer,
    pixels: wgpu::Buffer,
    packed: wgpu::Buffer,
    thumb: wgpu::Buffer,
    model: &'g Cppn,
}

impl<'g> BandRenderer<'g> {
    /// Buffers for bands of at most `max_samples` samples, `max_pixels` pixels and `max_thumb`
    /// thumbnail pixels.
    pub fn new(gpu: &'g Gpu, model: &'g Cppn, max_samples: usize, max_pixels: usize, max_thumb: usize) -> Self {
        let weights = model.flat_weights();
        BandRenderer {
            gpu,
            weights: {
                // A uniform buffer (see the header of cppn.wgsl): 3684 weights = 921 vec4.
                let b = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("weights"),
                    size: (weights.len() * 4) as u64,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                gpu.write(&b, &weights);
                b
            },
            cppn: gpu.uniform::<CppnParams>("cppn params"),
            post: gpu.uniform::<PostParams>("post params"),
            samples: gpu.storage("samples", (max_samples * 12) as u64),
            pixels: gpu.storage("pixels", (max_pixels * 12) as u64),
            packed: gpu.storage("packed", (max_pixels * 4) as u64),
            thumb: gpu.storage("thumb", (max_thumb * 4) as u64),
            model,
        }
    }

    /// Records the fused CPPN kernel over `tile` into the samples buffer.
    fn model_pass(&self, enc: &mut wgpu::CommandEncoder, tile: &SampleTile) {
        let (g, m) = (self.gpu, self.model);
        let mut latent = [0.0; 8];
        latent.copy_from_slice(&m.latent);
        let params = CppnParams {
            tile: [tile.x0, tile.y0, tile.w, tile.h],
            grid: [tile.full_w, tile.full_h, m.style.symmetry.code(), 0],
            acts: m.acts.map(|a| a.code()),
            style: [m.style.frequency, 0.0, 0.0, 0.0],
            latent,
        };
        g.write(&self.cppn, &[params]);
        g.dispatch(enc, &g.pipelines.cppn, &[&self.cppn, &self.weights, &self.samples], tile.len() as u32);
    }

    /// The fused kernel alone over `tile`, waited for; the first `read` samples (3 floats each)
    /// read back. The benchmark's "model only" figure reads one, so an error still surfaces and
    /// the rest stays on the device.
    pub fn model_only(&self, tile: &SampleTile, read: usize) -> Result<Vec<f32>, EngineError> {
        let mut enc = self.gpu.encoder();
        self.model_pass(&mut enc, tile);
        let mut out = self.gpu.submit_and_read::<f32>(enc, &[(&self.samples, read.min(tile.len()) * 3)])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Renders one band: samples (fused kernel or given), tone, resolve, watermark, quantise and
    /// thumbnail, in one submission. Returns the packed 8-bit pixels and thumbnail pixels.
    pub fn run(
        &self,
        tile: &SampleTile,
        post: &PostParams,
        samples: Samples<'_>,
    ) -> Result<(Vec<u32>, Vec<u32>), EngineError> {
        let g = self.gpu;
        let p = &g.pipelines;
        let (width, rows) = (post.dims[0], post.dims[1]);
        let pixels = width * rows;
        let thumbs = post.dims2[3] * rows.div_ceil(post.dims2[2]);
        g.write(&self.post, &[*post]);
        let mut enc = g.encoder();
        match samples {
            Samples::Fused => self.model_pass(&mut enc, tile),
            Samples::Given(s) => g.write(&self.samples, s),
        }
        g.dispatch(&mut enc, &p.tone, &[&self.post, &self.samples], tile.len() as u32);
        g.dispatch(&mut enc, &p.resolve, &[&self.post, &self.samples, &self.pixels], pixels);
        g.dispatch(&mut enc, &p.watermark, &[&self.post, &self.pixels, g.glyphs()], pixels);
        g.dispatch(&mut enc, &p.quantize, &[&self.post, &self.pixels, &self.packed], pixels);
        g.dispatch(&mut enc, &p.thumbnail, &[&self.post, &self.pixels, &self.thumb], thumbs);
        let mut out =
            g.submit_and_read::<u32>(enc, &[(&self.packed, pixels as usize), (&self.thumb, thumbs as usize)])?;
        let thumb = out.pop().unwrap_or_default();
        let packed = out.pop().unwrap_or_default();
        Ok((packed, thumb))
    }
}

/// The GPU for tests: `None` (with a note) where no adapter exists, unless
/// `KILN_TEST_REQUIRE_WGPU=1`, which CI sets: then a missing adapter fails the test.
pub fn gpu_for_tests() -> Option<Arc<Gpu>> {
    static GPU: std::sync::OnceLock<Result<Arc<Gpu>, String>> = std::sync::OnceLock::new();
    match GPU.get_or_init(|| Gpu::new().map(Arc::new).map_err(|e| e.to_string())) {
        Ok(g) => Some(g.clone()),
        Err(e) => {
            if std::env::var("KILN_TEST_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                panic!("KILN_TEST_REQUIRE_WGPU=1 but wgpu is unusable: {e}");
            }
            eprintln!("skipping: no wgpu adapter ({e}); set KILN_TEST_REQUIRE_WGPU=1 to fail instead");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cppn::render_tile_cpu;
    use crate::engine::style::Style;
    use crate::post::{self, FLAG_DITHER, FLAG_WATERMARK};
    use crate::prng::Rng;

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    fn max_level_diff(a: &[u32], b: &[u32]) -> u32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .flat_map(|(x, y)| (0..3).map(move |c| ((x >> (8 * c)) & 0xff).abs_diff((y >> (8 * c)) & 0xff)))
            .max()
            .unwrap_or(0)
    }

    fn run_one<T: Pod>(
        g: &Gpu,
        pipeline: &wgpu::ComputePipeline,
        bufs: &[&wgpu::Buffer],
        threads: u32,
        read: &wgpu::Buffer,
        n: usize,
    ) -> Vec<T> {
        let mut enc = g.encoder();
        g.dispatch(&mut enc, pipeline, bufs, threads);
        g.submit_and_read::<T>(enc, &[(read, n)]).unwrap().remove(0)
    }

    #[test]
    fn the_fused_cppn_kernel_matches_the_cpu_path() {
        let Some(g) = gpu_for_tests() else { return };
        for (seed, prompt) in [(1, "ember"), (2, "kaleidoscope ocean busy"), (3, "quad neon")] {
            let c = Cppn::new(seed, Style::from_prompt(prompt));
            let tile = SampleTile { x0: 5, y0: 3, w: 61, h: 17, full_w: 80, full_h: 60 };
            let band = BandRenderer::new(&g, &c, tile.len(), 16, 16);
            let params = CppnParams {
                tile: [tile.x0, tile.y0, tile.w, tile.h],
                grid: [tile.full_w, tile.full_h, c.style.symmetry.code(), 0],
                acts: c.acts.map(|a| a.code()),
                style: [c.style.frequency, 0.0, 0.0, 0.0],
                latent: c.latent,
            };
            g.write(&band.cppn, &[params]);
            let gpu: Vec<f32> = run_one(
                &g,
                &g.pipelines.cppn,
                &[&band.cppn, &band.weights, &band.samples],
                tile.len() as u32,
                &band.samples,
                tile.len() * 3,
            );
            let mut cpu = vec![0.0; tile.len() * 3];
            render_tile_cpu(&c, &tile, 2, &mut cpu);
            // Stated tolerance: 1e-4 per channel (the same approximations; FMA and division rounding differ).
            let d = max_diff(&gpu, &cpu);
            assert!(d < 1e-4, "seed {seed}: cppn.wgsl vs CPU max difference {d}");
        }
    }

    #[test]
    fn each_post_kernel_matches_its_cpu_reference() {
        let Some(g) = gpu_for_tests() else { return };
        let style = Style::from_prompt("dusk");
        let (w, h, rows, y0, s) = (67u32, 90u32, 23u32, 16u32, 2u32);
        let f = 3;
        let tw = w.div_ceil(f);
        let p = PostParams::new(&style, w, h, rows, y0, s, FLAG_WATERMARK | FLAG_DITHER, (f, tw));
        let n_samples = (w * s * rows * s) as usize;
        let n_pixels = (w * rows) as usize;
        let n_thumb = (tw * rows.div_ceil(f)) as usize;
        let mut rng = Rng::new(5);
        let raw: Vec<f32> = (0..n_samples * 3).map(|_| rng.uniform()).collect();
        let post_buf = g.uniform::<PostParams>("post");
        g.write(&post_buf, &[p]);

        // tone: 1e-5.
        let samples = g.storage_init("samples", &raw);
        let toned_gpu: Vec<f32> =
            run_one(&g, &g.pipelines.tone, &[&post_buf, &samples], n_samples as u32, &samples, n_samples * 3);
        let mut toned = raw.clone();
        post::tone(&p, &mut toned);
        assert!(max_diff(&toned_gpu, &toned) < 1e-5, "tone: {}", max_diff(&toned_gpu, &toned));

        // resolve: 1e-6.
        let samples = g.storage_init("samples", &toned);
        let pixels = g.storage("pixels", (n_pixels * 12) as u64);
        let resolved_gpu: Vec<f32> =
            run_one(&g, &g.pipelines.resolve, &[&post_buf, &samples, &pixels], n_pixels as u32, &pixels, n_pixels * 3);
        let mut resolved = vec![0.0; n_pixels * 3];
        post::resolve(&p, &toned, &mut resolved);
        assert!(max_diff(&resolved_gpu, &resolved) < 1e-6, "resolve: {}", max_diff(&resolved_gpu, &resolved));

        // watermark: 1e-6, and it must have marked something.
        let pixels = g.storage_init("pixels", &resolved);
        let marked_gpu: Vec<f32> = run_one(
            &g,
            &g.pipelines.watermark,
            &[&post_buf, &pixels, g.glyphs()],
            n_pixels as u32,
            &pixels,
            n_pixels * 3,
        );
        let mut marked = resolved.clone();
        post::watermark(&p, &mut marked);
        assert_ne!(marked, resolved, "the watermark changed nothing");
        assert!(max_diff(&marked_gpu, &marked) < 1e-6, "watermark: {}", max_diff(&marked_gpu, &marked));

        // quantize (with dither): 1 level.
        let pixels = g.storage_init("pixels", &marked);
        let packed = g.storage("packed", (n_pixels * 4) as u64);
        let q_gpu: Vec<u32> =
            run_one(&g, &g.pipelines.quantize, &[&post_buf, &pixels, &packed], n_pixels as u32, &packed, n_pixels);
        let mut q = vec![0u32; n_pixels];
        post::quantize(&p, &marked, &mut q);
        assert!(max_level_diff(&q_gpu, &q) <= 1, "quantize: {} levels", max_level_diff(&q_gpu, &q));

        // thumbnail: 1 level.
        let thumb = g.storage("thumb", (n_thumb * 4) as u64);
        let t_gpu: Vec<u32> =
            run_one(&g, &g.pipelines.thumbnail, &[&post_buf, &pixels, &thumb], n_thumb as u32, &thumb, n_thumb);
        let mut t = vec![0u32; n_thumb];
        post::thumbnail(&p, &marked, &mut t);
        assert!(max_level_diff(&t_gpu, &t) <= 1, "thumbnail: {} levels", max_level_diff(&t_gpu, &t));
    }
}
