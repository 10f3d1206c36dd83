"""Running packed models: the deployment layer, grouped projections, the latent KV cache."""
