// qmatvec: y = W x for one input row (decode), W group-quantized (src/quant.rs): per row,
// groups of 32 inputs, each with one scale d and 32 integers q (q8: w = d q; q4: w = d (q - 8)).
// Weights are dequantized in registers; no full-precision copy of W exists anywhere.
//
// Bindings (group 0; storage is read_write throughout: cubecl may hand out slices of one
// buffer to several bindings of a dispatch, and wgpu refuses read-only next to read-write):
//   0  x       read_write  [in]                      (vec4 view; in % 4 == 0)
//   1  q       read_write  [out, groups * {{ vpg }}]  vec4<u32>: {{ vpg }} per group (q4: 1, q8: 2)
//   2  s       read_write  [out * groups]             scales: {{ scale_decl }}
//   3  y       read_write  [out]
//   4  info    uniform     QInfo
// Grid: (groups_x, groups_y) covering ceil(out / {{ rows }}) workgroups. Workgroup: {{ wg }}
// invocations (a power of two). Each workgroup computes {{ rows }} outputs: invocation t takes the
// groups t, t + {{ wg }}, ... of its rows (consecutive invocations read consecutive 16-byte words
// of a row), loads the group's 32 inputs once for all {{ rows }} rows, then a tree reduction in
// workgroup memory sums the partial dots. Inputs past `in` (the zero-padded tail of the last
// group) read as 0; rows past `out` are skipped; every index is checked against arrayLength.
{{ enable }}

struct QInfo {
    out_rows: u32,
    in4: u32,
    groups: u32,
    groups_x: u32,
}

const WG: u32 = {{ wg }}u;
const R: u32 = {{ rows }}u;

@group(0) @binding(0) var<storage, read_write> x: array<vec4<{{ elem }}>>;
@group(0) @binding(1) var<storage, read_write> q: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> s: array<{{ scale_elem }}>;
@group(0) @binding(3) var<storage, read_write> y: array<{{ elem }}>;
@group(0) @binding(4) var<uniform> info: QInfo;

var<workgroup> red: array<f32, {{ rwg }}>;

fn scale(i: u32) -> f32 {
    {{ scale_read }}
}

fn xv(i: u32) -> vec4<f32> {
    if (i < info.in4 && i < arrayLength(&x)) {
        return vec4<f32>(x[i]);
    }
    return vec4<f32>(0.0);
}

// q4: the low nibbles of a word's bytes are inputs 0..3 of its 8, the high nibbles 4..7.
fn dot_q4(w: u32, a: vec4<f32>, b: vec4<f32>) -> f32 {
    let v = vec4<u32>(w);
    let lo = vec4<f32>((v >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u));
    let hi = vec4<f32>((v >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(15u));
    return dot(lo, a) + dot(hi, b);
}

// q8: byte j of a word is input j, two's complement (shift it to the top, then back with sign).
fn dot_q8(w: u32, a: vec4<f32>) -> f32 {
    let v = bitcast<vec4<i32>>(vec4<u32>(w) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
    return dot(vec4<f32>(v), a);
}

@compute @workgroup_size({{ wg }})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let group = wid.x + wid.y * info.groups_x;
    let row0 = group * R;
    let q_len = arrayLength(&q);
    let s_len = arrayLength(&s);
    var acc: array<f32, {{ rows }}>;
    for (var r = 0u; r < R; r++) {
        acc[r] = 0.0;
    }
    for (var g = t; g < info.groups; g += WG) {
        // The group's 32 inputs as 8 vec4s.
        var xs: array<vec4<f32>, 8>;
        for (var i = 0u; i < 8u; i++) {
            xs[i] = xv(g * 8u + i);
        }
        {{ group_prologue }}
        for (var r = 0u; r < R; r++) {
            let row = row0 + r;
            let si = row * info.groups + g;
            let qi = si * {{ vpg }}u;
            if (row < info.out_rows && qi + {{ vpg }}u <= q_len && {{ s_index_check }}) {
                {{ group_dot }}
            }
        }
    }
    for (var r = 0u; r < R; r++) {
        red[r * WG + t] = acc[r];
    }
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (t < stride) {
            for (var r = 0u; r < R; r++) {
                red[r * WG + t] += red[r * WG + t + stride];
            }
        }
        workgroupBarrier();
    }
    // R may exceed WG (CPU adapters use few lanes and many rows): each lane writes R / WG rows.
    for (var r = t; r < R; r += WG) {
        let row = row0 + r;
        if (row < info.out_rows && row < arrayLength(&y)) {
            y[row] = {{ elem }}(red[r * WG]);
        }
    }
}
