"""The generation benchmark's fixed conditions: the prompt, the synthetic database's captions, the seed and
guidance, the sizes and precisions measured, the targets and the issue's reference numbers."""
PROMPT = "a dog barks while rain falls on a tin roof"
CAPTIONS = ["a dog barking", "rain falling on a roof", "church bells ringing", "a siren wailing",
            "birds chirping in the morning", "a car engine idling"]
SEED = 0
GUIDANCE = 2.5
TARGET_SECONDS, TARGET_CLIP, TARGET_STEPS, TARGET_RATIO = 10.0, 10.24, 20, 1.05
#: the issue's numbers: a bare diffusers loop at S with random weights, guidance batched, 20 DPM-Solver
#: steps, measured earlier on this machine (2 CPU cores)
ISSUE_REFERENCE = {
    "fp32": {"unet_step": 1.09, "vae": 2.9, "vocoder": 5.7, "total": 30.4},
    "bf16": {"unet_step": 0.50, "vae": 1.1, "vocoder": 5.7, "total": 17.0},
    "peak_rss_gb": 2.3,
}
SIZE_DEFAULTS = {"tiny": {"duration": 1.28, "k": 2}, "s": {"duration": 10.24, "k": 3}}
#: precision variants: (label, generation.precision, bf16 autocast around VAE and vocoder too)
PRECISIONS = [("fp32", "fp32", False), ("bf16 UNet", "bf16", False), ("bf16 UNet+VAE+vocoder", "bf16", True)]
