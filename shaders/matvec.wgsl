// matvec: y = W x for one input row (decode), W stored as HF stores Linear weights: [out, in].
//
// Bindings (group 0):
//   0  x       read_write  [in]        (vec4 view)
//   1  w       read_write  [out, in]   (vec4 view)
//   2  y       read_write  [out]
//   3  params  read_write  MatvecParams
// Grid: (groups_x, groups_y) covering ceil(out / {{ rows }}) workgroups. Workgroup: {{ wg }}
// invocations (a power of two). Each workgroup computes {{ rows }} outputs: invocation t reads
// the vec4s t, t + {{ wg }}, ... of each of its rows (consecutive invocations read consecutive
// memory), then a tree reduction in workgroup memory sums the partial dots. Rows beyond `out`
// and reads beyond the buffers are skipped.
{{ enable }}

struct MatvecParams {
    out_rows: u32,
    in4: u32,
    groups_x: u32,
    _pad: u32,
}

const WG: u32 = {{ wg }}u;
const R: u32 = {{ rows }}u;

@group(0) @binding(0) var<storage, read_write> x: array<vec4<{{ elem }}>>;
@group(0) @binding(1) var<storage, read_write> w: array<vec4<{{ elem }}>>;
@group(0) @binding(2) var<storage, read_write> y: array<{{ elem }}>;
@group(0) @binding(3) var<storage, read_write> p: MatvecParams;

var<workgroup> red: array<f32, {{ rwg }}>;

@compute @workgroup_size({{ wg }})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let group = wid.x + wid.y * p.groups_x;
    let row0 = group * R;
    let x_len = arrayLength(&x);
    let w_len = arrayLength(&w);
    var acc: array<f32, {{ rows }}>;
    for (var r = 0u; r < R; r++) {
        acc[r] = 0.0;
    }
    for (var i = t; i < p.in4 && i < x_len; i += WG) {
        let xv = vec4<f32>(x[i]);
        for (var r = 0u; r < R; r++) {
            let row = row0 + r;
            let src = row * p.in4 + i;
            if (row < p.out_rows && src < w_len) {
                acc[r] += dot(xv, vec4<f32>(w[src]));
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
    if (t < R) {
        let row = row0 + t;
        if (row < p.out_rows && row < arrayLength(&y)) {
            y[row] = {{ elem }}(red[t * WG]);
        }
    }
}
