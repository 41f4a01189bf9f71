//! The memory plan: every tensor a training step touches, with its shape, dtype and pool, laid out at
//! fixed offsets before anything is allocated (llm.c's `fill_in_activation_sizes`, made printable).
//!
//! Scratch tensors live in *scopes*. Scope 0 is persistent (e.g. the cuBLAS workspace) and must be filled
//! before the first other scope is opened; every other scope starts right after scope 0, so those scopes
//! alias each other. The code that uses a scope is responsible for never having two of them live at once
//! (each use site says why that holds). The scratch pool is scope 0 plus the largest other scope.
use std::fmt::Write;

/// Bytes between tensor starts are rounded up to this, so every tensor is aligned for vector loads.
pub(crate) const ALIGN: usize = 256;
/// Plan name of the cuBLAS workspace.
pub(crate) const CUBLAS_WORKSPACE: &str = "cublas.workspace";
pub(crate) const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Element type of a planned tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum DType {
    /// 32-bit float: parameters, gradients, optimizer state, activations.
    F32,
    /// bfloat16.
    BF16,
    /// 32-bit signed integer: labels.
    I32,
    /// Bytes: GPS masks, workspaces.
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 => 2,
            DType::U8 => 1,
        }
    }
}

/// The pools of the engine; one device allocation each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Pool {
    /// Backbone weights that are not trained: no gradient, no optimizer state.
    Frozen,
    /// The trainable set (fp32 master copy).
    Trainable,
    /// Gradients of the trainable set.
    Grads,
    /// AdamW moments of the trainable set, and the allocator's EMAs.
    Optimizer,
    /// What the backward pass needs from the forward pass.
    Activations,
    /// Short-lived buffers reused between layers (M, M_s, gradients of activations, GEMM workspace).
    Scratch,
}

impl Pool {
    /// Every pool, in allocation order.
    pub const ALL: [Pool; 6] =
        [Pool::Frozen, Pool::Trainable, Pool::Grads, Pool::Optimizer, Pool::Activations, Pool::Scratch];
    /// Lower-case name as printed in tables (`frozen`, `trainable`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Pool::Frozen => "frozen",
            Pool::Trainable => "trainable",
            Pool::Grads => "grads",
            Pool::Optimizer => "optimizer",
            Pool::Activations => "activations",
            Pool::Scratch => "scratch",
        }
    }
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// One planned tensor.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TensorSpec {
    /// Unique name, e.g. `blocks.3.mlp.fc1.weight`, `grad.<param>`, `adamw.m.<param>`, `act.3.ln1`.
    pub name: String,
    /// Shape in elements, outermost first.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
    /// The pool (device allocation) it lives in.
    pub pool: Pool,
    /// Scratch scope (0 for every other pool).
    pub scope: usize,
    /// Byte offset inside the pool.
    pub offset: usize,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Size in bytes (before alignment).
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

/// A handle to a planned tensor: where it lives and how many elements it has. Cheap to copy; the name and
/// shape stay in the plan (`Plan::spec`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tensor {
    pub(crate) id: u32,
    pub(crate) pool: Pool,
    pub(crate) offset: usize,
    pub(crate) numel: usize,
    pub(crate) dtype: DType,
}

impl Tensor {
    pub fn bytes(&self) -> usize {
        self.numel * self.dtype.size()
    }
    /// A sub-range of `len` elements starting `start` elements in (same dtype), e.g. one layer of a stack.
    pub fn slice(&self, start: usize, len: usize) -> Tensor {
        assert!(start + len <= self.numel, "slice {start}+{len} out of {} elements", self.numel);
        Tensor { offset: self.offset + start * self.dtype.size(), numel: len, ..*self }
    }
}

/// Every tensor of a training step, laid out in pools before anything is allocated. Read it with
/// [`Plan::table`], [`Plan::tensor_table`], [`Plan::tensors`] and [`Plan::get`]; models build it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Plan {
    pub(crate) tensors: Vec<TensorSpec>,
    /// End of the used bytes of each pool (for scratch: of each scope).
    ends: [usize; 6],
    scope_ends: Vec<usize>,
    current_scope: usize,
    /// Where scopes other than 0 start (end of scope 0 once the first of them is opened).
    scope_base: Option<usize>,
}

fn align(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

impl Plan {
    pub(crate) fn new() -> Self {
        Plan { scope_ends: vec![0], ..Default::default() }
    }

    /// Adds a tensor; scratch tensors go into the current scope.
    pub(crate) fn add(&mut self, name: impl Into<String>, shape: &[usize], dtype: DType, pool: Pool) -> Tensor {
        let (scope, offset) = if pool == Pool::Scratch {
            assert!(
                self.current_scope != 0 || self.scope_base.is_none(),
                "scratch scope 0 is closed once other scopes exist"
            );
            let off = self.scope_ends[self.current_scope];
            (self.current_scope, off)
        } else {
            (0, self.ends[pool.index()])
        };
        let spec = TensorSpec { name: name.into(), shape: shape.to_vec(), dtype, pool, scope, offset };
        let end = align(offset + spec.bytes());
        if pool == Pool::Scratch {
            self.scope_ends[scope] = end;
            self.ends[pool.index()] = self.ends[pool.index()].max(end);
        } else {
            self.ends[pool.index()] = end;
        }
        let t = Tensor { id: self.tensors.len() as u32, pool, offset, numel: spec.numel(), dtype };
        self.tensors.push(spec);
        t
    }

    /// The cuBLAS workspace (32 MiB, what NVIDIA recommends for Hopper), in persistent scratch so cuBLAS
    /// allocates nothing of its own; planned on every device so the printed plan is the GPU's plan.
    pub(crate) fn add_cublas_workspace(&mut self) -> Tensor {
        self.add(CUBLAS_WORKSPACE, &[CUBLAS_WORKSPACE_BYTES], DType::U8, Pool::Scratch)
    }

    pub(crate) fn f32(&mut self, name: impl Into<String>, shape: &[usize], pool: Pool) -> Tensor {
        self.add(name, shape, DType::F32, pool)
    }

    /// Starts a new scratch scope after scope 0 (aliasing every other scope) and returns its index.
    pub(crate) fn scope(&mut self) -> usize {
        let base = *self.scope_base.get_or_insert(self.scope_ends[0]);
        self.scope_ends.push(base);
        self.current_scope = self.scope_ends.len() - 1;
        self.current_scope
    }

    pub(crate) fn spec(&self, t: Tensor) -> &TensorSpec {
        &self.tensors[t.id as usize]
    }

    /// Every planned tensor, in planning order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// The tensor of that name, if planned.
    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|s| s.name == name)
    }

    pub(crate) fn find(&self, name: &str) -> Option<Tensor> {
        self.tensors.iter().enumerate().find(|(_, s)| s.name == name).map(|(i, s)| Tensor {
            id: i as u32,
            pool: s.pool,
            offset: s.offset,
            numel: s.numel(),
            dtype: s.dtype,
        })
    }

    /// Bytes of one pool (the allocation size).
    pub fn pool_bytes(&self, pool: Pool) -> usize {
        self.ends[pool.index()]
    }

    /// Bytes of all pools together: the model's device footprint for a training step.
    pub fn total_bytes(&self) -> usize {
        Pool::ALL.iter().map(|&p| self.pool_bytes(p)).sum()
    }

    /// Number of tensors planned in a pool.
    pub fn pool_tensors(&self, pool: Pool) -> usize {
        self.tensors.iter().filter(|t| t.pool == pool).count()
    }

    /// The plan as a table: pool, tensors, MiB.
    pub fn table(&self) -> String {
        let mut s = String::new();
        writeln!(s, "{:<12} {:>8} {:>12}", "pool", "tensors", "MiB").unwrap();
        for p in Pool::ALL {
            writeln!(s, "{:<12} {:>8} {:>12.2}", p.name(), self.pool_tensors(p), mib(self.pool_bytes(p))).unwrap();
        }
        writeln!(s, "{:<12} {:>8} {:>12.2}", "total", self.tensors.len(), mib(self.total_bytes())).unwrap();
        s
    }

    /// Every tensor of a pool: name, shape, dtype, MiB.
    pub fn tensor_table(&self, pool: Pool) -> String {
        let mut s = String::new();
        for t in self.tensors.iter().filter(|t| t.pool == pool) {
            writeln!(
                s,
                "{:<48} {:<20} {:?} scope {:<3} {:>10.3} MiB",
                t.name,
                format!("{:?}", t.shape),
                t.dtype,
                t.scope,
                mib(t.bytes())
            )
            .unwrap();
        }
        s
    }
}

/// Bytes to MiB (2^20 bytes).
pub fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_aligned_and_disjoint() {
        let mut p = Plan::new();
        let a = p.f32("a", &[3, 5], Pool::Frozen);
        let b = p.f32("b", &[7], Pool::Frozen);
        assert_eq!(a.offset, 0);
        assert_eq!(b.offset, ALIGN);
        assert_eq!(p.pool_bytes(Pool::Frozen), 2 * ALIGN);
        assert_eq!(p.pool_bytes(Pool::Grads), 0);
    }

    #[test]
    fn scratch_scopes_alias_and_pool_is_the_largest_scope() {
        let mut p = Plan::new();
        let w = p.f32("workspace", &[64], Pool::Scratch);
        p.scope();
        let a = p.f32("a", &[1000], Pool::Scratch); // 4000 B -> 4096
        let a2 = p.f32("a2", &[10], Pool::Scratch);
        p.scope();
        let b = p.f32("b", &[100], Pool::Scratch);
        assert_eq!(w.offset, 0);
        assert_eq!(a.offset, 256);
        assert_eq!(a2.offset, 256 + 4096);
        assert_eq!(b.offset, 256);
        assert_eq!(p.pool_bytes(Pool::Scratch), 256 + 4096 + 256);
        assert!(p.table().contains("scratch"));
    }
}
