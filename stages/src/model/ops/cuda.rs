//! Shared pieces of the fused ops' CUDA side: the kernels' PTX (the `.cu` files
//! beside the ops, compiled by `build.rs` with nvcc and loaded through candle's
//! CUDA device), reading tensors as device views, launching, and the
//! strided-batched products of the attention core (cuBLAS, with the head split
//! as strides).
//!
//! Every op's `cuda_fwd` sits beside its `cpu_fwd`, and its `bwd` launches kernels
//! when its inputs are on a CUDA device, so no CPU round trip happens in a step.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::result::CublasError;
use candle_core::cuda_backend::cudarc::cublas::{
    result::gemm_strided_batched_ex, sys, sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape, Storage, Tensor};

/// The PTX of each `.cu` file, named after it (`LAYER_NORM`, `ADAMW`, ...).
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ops_ptx.rs"));
}

/// One `.cu` file's module.
#[derive(Clone, Copy)]
pub(crate) struct Module {
    pub(crate) name: &'static str,
    pub(crate) ptx: &'static str,
}

/// `NAME = "module name"`: the module of `NAME.cu`'s PTX (`ptx::NAME`).
macro_rules! modules {
    ($($name:ident = $label:literal),+ $(,)?) => {
        $(pub(crate) const $name: Module = Module { name: $label, ptx: ptx::$name };)+
    };
}

modules!(
    ATTENTION = "crossmae-attention",
    COLUMN_SUMS = "crossmae-column-sums",
    DRAW_LOSS = "crossmae-draw-loss",
    GELU = "crossmae-gelu",
    LAYER_NORM = "crossmae-layer-norm",
    PIXELS = "crossmae-pixels",
    PRED_LOSS = "crossmae-pred-loss",
    ADAMW = "crossmae-adamw",
);

/// Threads per block of the row kernels (`ROW_THREADS` in common.cuh).
pub(crate) const ROW_THREADS: u32 = 256;
/// Rows per partial of a column reduction (`COL_CHUNK` in common.cuh).
pub(crate) const COL_CHUNK: usize = 256;

/// Launches kernel `$kernel` of `$module` on `$dev` with `$cfg` and the argument
/// references (to locals: the builder borrows them until the launch).
/// A macro, not a function: the launch builder's lifetime is that of the arguments.
macro_rules! launch {
    ($dev:expr, $module:expr, $kernel:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg as _;
        use candle_core::cuda_backend::WrapErr as _;
        let module: $crate::model::ops::cuda::Module = $module;
        let cfg: candle_core::cuda_backend::cudarc::driver::LaunchConfig = $cfg;
        // An empty input (no rows) has nothing to compute, and the driver refuses an
        // empty grid.
        if cfg.grid_dim.0 as u64 * cfg.grid_dim.1 as u64 * cfg.grid_dim.2 as u64 > 0 {
            let func = $dev.get_or_load_custom_func($kernel, module.name, module.ptx)?;
            let mut builder = func.builder();
            $( builder.arg($arg); )+
            // SAFETY: each caller passes the argument list of the kernel's C signature, with
            // device buffers of the extents the kernel reads and writes.
            unsafe { builder.launch(cfg) }.w()?;
        }
    }};
}
pub(crate) use launch;

/// One block of `threads` per row.
pub(crate) fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride loop over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The first stage of a column reduction over (rows, d): blocks of (32, 8) threads,
/// 32 columns by `COL_CHUNK` rows each. Returns the config and the number of chunks.
pub(crate) fn column_partial(rows: usize, d: usize) -> (LaunchConfig, usize) {
    let chunks = rows.div_ceil(COL_CHUNK).max(1);
    let cfg = LaunchConfig {
        grid_dim: (d.div_ceil(32) as u32, chunks as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    (cfg, chunks)
}

/// Sums `partial` (chunks, d) over chunks, in chunk order, into a (d) tensor.
pub(crate) fn finish_columns(dev: &CudaDevice, partial: &CudaSlice<f32>, chunks: usize, d: usize) -> Result<Tensor> {
    let out = alloc::<f32>(dev, d)?;
    let cfg = LaunchConfig {
        grid_dim: (d.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (chunks, width) = (chunks as i32, d as i32);
    launch!(
        dev,
        COLUMN_SUMS,
        "column_sums_finish_f32",
        cfg,
        partial,
        &out,
        &chunks,
        &width
    );
    Ok(tensor(out, dev, d))
}

/// Column sums of the contiguous (rows, d) `g`: the bias gradient.
pub(crate) fn column_sums(dev: &CudaDevice, g: &CudaView<'_, f32>, rows: usize, d: usize) -> Result<Tensor> {
    let (cfg, chunks) = column_partial(rows, d);
    let partial = alloc::<f32>(dev, chunks * d)?;
    let (r, w) = (rows as i32, d as i32);
    launch!(dev, COLUMN_SUMS, "column_sums_partial_f32", cfg, g, &partial, &r, &w);
    finish_columns(dev, &partial, chunks, d)
}

/// A device buffer for a kernel that writes every element before anything reads it.
pub(crate) fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: as `output_vec` on the CPU: the callers' kernels write every element.
    unsafe { dev.alloc::<T>(n.max(1)) }
}

/// A tensor (no graph node) from a device buffer.
pub(crate) fn tensor<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(T::wrap_cuda_slice(slice, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// The output storage of a `cuda_fwd`.
pub(crate) fn storage<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    T::wrap_cuda_slice(slice, dev.clone())
}

/// The contiguous values of a CUDA storage as a view.
pub(crate) fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let slice = s
        .as_cuda_slice::<T>()
        .map_err(|e| candle_core::Error::Msg(format!("{what}: {e}")))?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Runs `f` on the device and the contiguous values of CUDA tensors (the backward
/// passes, where saved tensors meet): the twin of the CPU's `with_slices`.
pub(crate) fn with_views<const N: usize, T: CudaDType, R>(
    ts: [&Tensor; N],
    what: &str,
    f: impl FnOnce(&CudaDevice, [CudaView<'_, T>; N]) -> Result<R>,
) -> Result<R> {
    let owned: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(N);
    let mut dev = None;
    for (i, (guard, layout)) in guards.iter().enumerate() {
        let Storage::Cuda(cuda) = &**guard else {
            candle_core::bail!("{what}: input {i} is not on a CUDA device")
        };
        dev.get_or_insert_with(|| cuda.device().clone());
        views.push(view::<T>(cuda, layout, what)?);
    }
    let Some(dev) = dev else {
        candle_core::bail!("{what}: no inputs")
    };
    let views: [CudaView<'_, T>; N] = views
        .try_into()
        .map_err(|_| candle_core::Error::Msg(format!("{what}: {N} inputs expected")))?;
    f(&dev, views)
}

/// Whether `t` lives on a CUDA device (the backward passes dispatch on it).
pub(crate) fn on_cuda(t: &Tensor) -> bool {
    t.device().is_cuda()
}

pub(crate) use super::strided_product::Product;

/// cuBLAS's operation for an operand used transposed or as stored.
fn operation(transposed: bool) -> cublasOperation_t {
    if transposed {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

impl Product {
    /// Runs the product (C overwritten) on the device's cuBLAS handle and stream.
    pub(crate) fn run<T: Scalar>(
        &self,
        dev: &CudaDevice,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        c: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.check(a.len(), b.len(), c.len())?;
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: operation(self.transa),
                transb: operation(self.transb),
                m: self.m as i32,
                n: self.n as i32,
                k: self.k as i32,
                alpha: T::ONE,
                lda: self.a.1 .0 as i32,
                ldb: self.b.1 .0 as i32,
                beta: T::ZERO,
                ldc: self.c.1 .0 as i32,
            },
            batch_size: self.batch as i32,
            stride_a: self.a.1 .1 as i64,
            stride_b: self.b.1 .1 as i64,
            stride_c: self.c.1 .1 as i64,
        };
        let blas = dev.cublas_handle();
        let (a, b) = (a.slice(self.a.0..), b.slice(self.b.0..));
        let mut c = c.slice_mut(self.c.0..);
        // SAFETY: `check` bounded every element each operand's layout reaches.
        unsafe { T::gemm_strided_batched(&blas, cfg, &a, &b, &mut c) }.w()?;
        Ok(())
    }

    /// The product of `T` operands into f32 (cublasGemmStridedBatchedEx, f32
    /// accumulation): the attention's scores and dP, kept in f32 under bf16 too.
    pub(crate) fn run_to_f32<T: Scalar>(
        &self,
        dev: &CudaDevice,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.check(a.len(), b.len(), c.len())?;
        let blas = dev.cublas_handle();
        let stream = dev.cuda_stream();
        let (a, b) = (a.slice(self.a.0..), b.slice(self.b.0..));
        let mut c = c.slice_mut(self.c.0..);
        let (alpha, beta) = (1f32, 0f32);
        let (a_ptr, _a_sync) = a.device_ptr(&stream);
        let (b_ptr, _b_sync) = b.device_ptr(&stream);
        let (c_ptr, _c_sync) = c.device_ptr_mut(&stream);
        // SAFETY: `check` bounded every element each operand's layout reaches; the
        // pointers stay valid until the syncs drop, after the call is queued on the
        // stream the handle runs on (candle's).
        unsafe {
            gemm_strided_batched_ex(
                *blas.handle(),
                operation(self.transa),
                operation(self.transb),
                self.m as i32,
                self.n as i32,
                self.k as i32,
                (&alpha) as *const f32 as *const _,
                a_ptr as *const _,
                T::CUDA_TYPE,
                self.a.1 .0 as i32,
                self.a.1 .1 as i64,
                b_ptr as *const _,
                T::CUDA_TYPE,
                self.b.1 .0 as i32,
                self.b.1 .1 as i64,
                (&beta) as *const f32 as *const _,
                c_ptr as *mut _,
                sys::cudaDataType_t::CUDA_R_32F,
                self.c.1 .0 as i32,
                self.c.1 .1 as i64,
                self.batch as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .w()?;
        Ok(())
    }
}

/// The product dtypes: cuBLAS's alpha (1) and beta (0), its data type, and its
/// strided-batched product (f32: SGEMM; bf16: bf16 operands and output, f32
/// accumulation).
pub(crate) trait Scalar: Copy + DeviceRepr + CudaDType {
    const ONE: Self;
    const ZERO: Self;
    const CUDA_TYPE: sys::cudaDataType_t;

    /// # Safety
    /// The configuration's extents must lie inside the buffers.
    unsafe fn gemm_strided_batched(
        blas: &CudaBlas,
        cfg: StridedBatchedConfig<Self>,
        a: &CudaView<'_, Self>,
        b: &CudaView<'_, Self>,
        c: &mut CudaViewMut<'_, Self>,
    ) -> std::result::Result<(), CublasError>;
}

impl Scalar for f32 {
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
    const CUDA_TYPE: sys::cudaDataType_t = sys::cudaDataType_t::CUDA_R_32F;

    unsafe fn gemm_strided_batched(
        blas: &CudaBlas,
        cfg: StridedBatchedConfig<Self>,
        a: &CudaView<'_, Self>,
        b: &CudaView<'_, Self>,
        c: &mut CudaViewMut<'_, Self>,
    ) -> std::result::Result<(), CublasError> {
        // SAFETY: the caller's.
        unsafe { Gemm::<f32>::gemm_strided_batched(blas, cfg, a, b, c) }
    }
}

impl Scalar for half::bf16 {
    const ONE: Self = half::bf16::ONE;
    const ZERO: Self = half::bf16::ZERO;
    const CUDA_TYPE: sys::cudaDataType_t = sys::cudaDataType_t::CUDA_R_16BF;

    unsafe fn gemm_strided_batched(
        blas: &CudaBlas,
        cfg: StridedBatchedConfig<Self>,
        a: &CudaView<'_, Self>,
        b: &CudaView<'_, Self>,
        c: &mut CudaViewMut<'_, Self>,
    ) -> std::result::Result<(), CublasError> {
        // SAFETY: the caller's.
        unsafe { Gemm::<half::bf16>::gemm_strided_batched(blas, cfg, a, b, c) }
    }
}

/// The end of a loss: `(loss, count)` partials of `blocks` blocks summed in block
/// order by one block; returns the loss (a scalar) and the count (1 value, for the backward).
pub(crate) fn finish_loss(
    dev: &CudaDevice,
    partial: &CudaSlice<f32>,
    blocks: usize,
) -> Result<(CudaSlice<f32>, Tensor)> {
    let (loss, count) = (alloc::<f32>(dev, 1)?, alloc::<f32>(dev, 1)?);
    let blocks = blocks as i32;
    launch!(
        dev,
        PRED_LOSS,
        "loss_finish_f32",
        per_row(1, ROW_THREADS),
        partial,
        &loss,
        &count,
        &blocks
    );
    Ok((loss, tensor(count, dev, 1)))
}
