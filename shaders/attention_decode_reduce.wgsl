// attention_decode, pass 2 of 2: merges the per-chunk partial results of pass 1.
//
// Bindings (group 0):
//   0  part_o   read        [heads, chunks, head_dim] f32 (vec4 view)
//   1  part_ml  read        [heads, chunks, 2] f32
//   2  out      read_write  [heads, head_dim]            (vec4 view)
//   3  params   read        DecodeParams (same struct as pass 1)
// Grid: (heads). Workgroup: {{ wg }} invocations, each owning vec4s of the head's output.
// out = sum_c o_c exp(m_c - M) / sum_c l_c exp(m_c - M), with M = max_c m_c.
{{ enable }}

struct DecodeParams {
    heads: u32,
    kv_heads: u32,
    capacity: u32,
    len: u32,
    chunks: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}

const D4: u32 = {{ d4 }}u;

@group(0) @binding(0) var<storage, read_write> part_o: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> part_ml: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<{{ elem }}>>;
@group(0) @binding(3) var<storage, read_write> p: DecodeParams;

@compute @workgroup_size({{ wg }})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let h = wid.x;
    if (h >= p.heads) {
        return;
    }
    let ml_len = arrayLength(&part_ml);
    let o_len = arrayLength(&part_o);
    var big_m = -3.0e38;
    for (var c = 0u; c < p.chunks; c++) {
        let i = (h * p.chunks + c) * 2u;
        if (i + 1u < ml_len) {
            big_m = max(big_m, part_ml[i]);
        }
    }
    var l = 0.0;
    for (var c = 0u; c < p.chunks; c++) {
        let i = (h * p.chunks + c) * 2u;
        if (i + 1u < ml_len) {
            l += part_ml[i + 1u] * exp(part_ml[i] - big_m);
        }
    }
    let inv = select(0.0, 1.0 / l, l > 0.0);
    for (var d = t; d < D4; d += {{ wg }}u) {
        var o = vec4<f32>(0.0);
        for (var c = 0u; c < p.chunks; c++) {
            let i = (h * p.chunks + c) * 2u;
            let src = (h * p.chunks + c) * D4 + d;
            if (i + 1u < ml_len && src < o_len) {
                o += part_o[src] * exp(part_ml[i] - big_m);
            }
        }
        let dst = h * D4 + d;
        if (dst < arrayLength(&out)) {
            out[dst] = vec4<{{ elem }}>(o * inv);
        }
    }
}
