// attention_decode, pass 1 of 2 (flash-decoding): one query token per head against
// cache[0..len), the sequence split into chunks of {{ chunk }} positions.
//
// Bindings (group 0):
//   0  q        read        [heads, head_dim]               (vec4 view)
//   1  cache_k  read        [kv_heads, capacity, head_dim]  (vec4 view)
//   2  cache_v  read        [kv_heads, capacity, head_dim]  (vec4 view)
//   3  part_o   read_write  [heads, chunks, head_dim] f32   (vec4 view): unnormalised outputs
//   4  part_ml  read_write  [heads, chunks, 2] f32: running max m and sum l of each chunk
//   5  params   read        DecodeParams
// Grid: (chunks, kv_heads). Workgroup: {{ wg }} invocations (a power of two).
// One workgroup serves the {{ group }} query heads that share a kv head (GQA), so each K/V row is
// read once for all of them. Algorithm: scores s = q.k * scale for the chunk's positions go to
// workgroup memory; m = max s and l = sum exp(s - m) by tree reduction; o = sum exp(s - m) v.
// Pass 2 (attention_decode_reduce) merges the chunks. Positions at or beyond len are excluded;
// every load is bounds-checked.
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

const WG: u32 = {{ wg }}u;
const G: u32 = {{ group }}u;
const D4: u32 = {{ d4 }}u;
const C: u32 = {{ chunk }}u;
const NEG: f32 = -3.0e38;

@group(0) @binding(0) var<storage, read_write> q: array<vec4<{{ elem }}>>;
@group(0) @binding(1) var<storage, read_write> cache_k: array<vec4<{{ elem }}>>;
@group(0) @binding(2) var<storage, read_write> cache_v: array<vec4<{{ elem }}>>;
@group(0) @binding(3) var<storage, read_write> part_o: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> part_ml: array<f32>;
@group(0) @binding(5) var<storage, read_write> p: DecodeParams;

var<workgroup> q_s: array<vec4<f32>, {{ gd4 }}>;
var<workgroup> s_s: array<f32, {{ gc }}>;
var<workgroup> red: array<f32, {{ gwg }}>;
var<workgroup> stat: array<f32, {{ g2 }}>;

fn reduce(t: u32, is_max: bool) {
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (t < stride) {
            for (var g = 0u; g < G; g++) {
                let a = red[g * WG + t];
                let b = red[g * WG + t + stride];
                red[g * WG + t] = select(a + b, max(a, b), is_max);
            }
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size({{ wg }})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let chunk = wid.x;
    let kvh = wid.y;
    let start = chunk * C;
    var n = 0u;
    if (start < p.len) {
        n = min(C, p.len - start);
    }
    let k_len = arrayLength(&cache_k);
    let q_len = arrayLength(&q);

    for (var i = t; i < G * D4; i += WG) {
        let src = kvh * G * D4 + i;
        if (src < q_len) {
            q_s[i] = vec4<f32>(q[src]);
        } else {
            q_s[i] = vec4<f32>(0.0);
        }
    }
    workgroupBarrier();

    // Scores of this chunk's positions for every query head of the group.
    for (var j = t; j < C; j += WG) {
        var acc: array<f32, {{ group }}>;
        for (var g = 0u; g < G; g++) {
            acc[g] = 0.0;
        }
        let row = (kvh * p.capacity + start + j) * D4;
        let valid = j < n && row + D4 <= k_len;
        if (valid) {
            for (var d = 0u; d < D4; d++) {
                let kv = vec4<f32>(cache_k[row + d]);
                for (var g = 0u; g < G; g++) {
                    acc[g] += dot(q_s[g * D4 + d], kv);
                }
            }
        }
        for (var g = 0u; g < G; g++) {
            s_s[g * C + j] = select(NEG, acc[g] * p.scale, valid);
        }
    }
    workgroupBarrier();

    // m = max s per head.
    for (var g = 0u; g < G; g++) {
        var m = NEG;
        for (var j = t; j < n; j += WG) {
            m = max(m, s_s[g * C + j]);
        }
        red[g * WG + t] = m;
    }
    workgroupBarrier();
    reduce(t, true);
    if (t < G) {
        stat[t] = red[t * WG];
    }
    workgroupBarrier();

    // e = exp(s - m), l = sum e.
    for (var g = 0u; g < G; g++) {
        let m = stat[g];
        var l = 0.0;
        for (var j = t; j < C; j += WG) {
            var e = 0.0;
            if (j < n) {
                e = exp(s_s[g * C + j] - m);
            }
            s_s[g * C + j] = e;
            l += e;
        }
        red[g * WG + t] = l;
    }
    workgroupBarrier();
    reduce(t, false);
    if (t < G) {
        stat[G + t] = red[t * WG];
    }
    workgroupBarrier();

    // o = sum e v, one vec4 of one head per step.
    let v_len = arrayLength(&cache_v);
    let o_len = arrayLength(&part_o);
    for (var i = t; i < G * D4; i += WG) {
        let g = i / D4;
        let d = i % D4;
        var o = vec4<f32>(0.0);
        for (var j = 0u; j < n; j++) {
            let src = (kvh * p.capacity + start + j) * D4 + d;
            if (src < v_len) {
                o += s_s[g * C + j] * vec4<f32>(cache_v[src]);
            }
        }
        let dst = ((kvh * G + g) * p.chunks + chunk) * D4 + d;
        if (dst < o_len) {
            part_o[dst] = o;
        }
    }
    if (t < G) {
        let dst = ((kvh * G + t) * p.chunks + chunk) * 2u;
        if (dst + 1u < arrayLength(&part_ml)) {
            part_ml[dst] = stat[t];
            part_ml[dst + 1u] = stat[G + t];
        }
    }
}
