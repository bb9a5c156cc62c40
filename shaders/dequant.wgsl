// dequant: rows of a group-quantized weight (src/quant.rs) to full precision, for the
// multiplications of several rows (prefill, the vision tower: a temporary that lives for one
// matmul) and for embedding lookups (only the looked-up rows, `gather`).
//
// Bindings (group 0; storage is read_write throughout: cubecl may hand out slices of one
// buffer to several bindings of a dispatch, and wgpu refuses read-only next to read-write):
//   0  q       read_write  [rows_src, words]   u32 words, {{ per_word }} integers each
//   1  s       read_write  [rows_src * groups] scales: {{ scale_decl }}
//   2  out     read_write  [n, cols]
//   3  ids     read_write  [n] source row of each output row (gather only: {{ gather }})
//   4  info    uniform     DInfo (binding 3 when not gathering)
// Grid: (groups_x, groups_y) covering ceil(n * words / {{ wg }}) workgroups of {{ wg }}
// invocations; invocation i dequantizes word i % words of output row i / words ({{ per_word }}
// outputs, fewer in a row's zero-padded tail). A source row outside `rows_src` writes zeros.
{{ enable }}

struct DInfo {
    n: u32,
    cols: u32,
    words: u32,
    groups: u32,
    rows_src: u32,
    groups_x: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read_write> q: array<u32>;
@group(0) @binding(1) var<storage, read_write> s: array<{{ scale_elem }}>;
@group(0) @binding(2) var<storage, read_write> out: array<{{ elem }}>;
{{ ids_decl }}
@group(0) @binding({{ info_binding }}) var<uniform> info: DInfo;

fn scale(i: u32) -> f32 {
    {{ scale_read }}
}

// Integer of element j (0..{{ per_word }}) of word w, offset removed.
fn element(w: u32, j: u32) -> f32 {
    {{ element }}
}

@compute @workgroup_size({{ wg }})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = (wid.x + wid.y * info.groups_x) * {{ wg }}u + t;
    let r = i / info.words;
    let k = i % info.words;
    if (r >= info.n) {
        return;
    }
    let src = src_of(r);
    let ok = src < info.rows_src;
    let qi = src * info.words + k;
    let c0 = k * {{ per_word }}u;
    let si = src * info.groups + c0 / 32u;
    let s_len = arrayLength(&s);
    let readable = ok && qi < arrayLength(&q) && {{ s_index_check }};
    var w = 0u;
    var d = 0.0;
    if (readable) {
        w = q[qi];
        d = scale(si);
    }
    let o_len = arrayLength(&out);
    for (var j = 0u; j < {{ per_word }}u; j++) {
        let c = c0 + j;
        let o = r * info.cols + c;
        if (c < info.cols && o < o_len) {
            var v = 0.0;
            if (readable) {
                v = d * element(w, j);
            }
            out[o] = {{ elem }}(v);
        }
    }
}
