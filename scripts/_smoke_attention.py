import jax, jax.numpy as jnp, numpy as np, time
import jfused
H=jax.lax.Precision.HIGHEST
import sys
B,T,S,N,K,D = 2, 100, 130, 4, 2, int(sys.argv[1]) if len(sys.argv)>1 else 40
ks = jax.random.split(jax.random.key(0), 8)
q = jax.random.normal(ks[0], (B,T,N,D)); k = jax.random.normal(ks[1], (B,S,K,D)); v = jax.random.normal(ks[2], (B,S,K,D))
bias = jax.random.normal(ks[3], (B,1,T,S))
mask = jax.random.bernoulli(ks[4], 0.8, (1,N,T,S))
seg_q = jnp.sort(jax.random.randint(ks[5], (B,T), 0, 3), axis=1).astype(jnp.int32)
seg_k = jnp.sort(jax.random.randint(ks[6], (B,S), 0, 3), axis=1).astype(jnp.int32)
cases = dict(
 plain=dict(), causal=dict(is_causal=True), window=dict(local_window_size=(10,5)),
 lens=dict(query_seq_lengths=jnp.array([50,100],jnp.int32), key_value_seq_lengths=jnp.array([0, 77], jnp.int32)),
 bias=dict(bias=bias), mask=dict(mask=mask), softcap=dict(logits_soft_cap=5.0, is_causal=True),
 seg=dict(q_segment_ids=seg_q, kv_segment_ids=seg_k),
)
def loss(impl, kw):
    def f(q,k,v,b):
        kw2 = dict(kw)
        if "bias" in kw2: kw2["bias"] = b
        o, l = jfused.dot_product_attention(q,k,v, implementation=impl, return_residual=True, **kw2)
        return o, l
    return f
for name, kw in cases.items():
    t0=time.time()
    with jax.default_matmul_precision("highest"):
      (o1, l1), vjp1 = jax.vjp(loss("pallas_triton", kw), q,k,v,bias)
      (o2, l2), vjp2 = jax.vjp(loss("xla", kw), q,k,v,bias)
      ct = jax.random.normal(ks[7], o1.shape)
      g1 = vjp1((ct, jnp.zeros_like(l1))); g2 = vjp2((ct, jnp.zeros_like(l2)))
    errs = [float(jnp.abs(o1-o2).max()), float(jnp.abs(l1-l2).max())] + [float(jnp.abs(a-b).max()) for a,b in zip(g1,g2)]
    print(name, ["%.1e"%e for e in errs], "nan" if any(np.isnan(errs)) else "", "%.1fs"%(time.time()-t0))
