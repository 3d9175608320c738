"""Stage objectives: ``nn.Module``s whose forward returns a dict of losses (``loss`` is optimised).

VAE: mel reconstruction + KL (optionally a patch discriminator, :class:`MelDiscriminator`); LDM: epsilon
(or v) MSE with guidance dropout; vocoder: mel L1 + multi-resolution STFT.
"""
from __future__ import annotations

import torch
from torch import nn

from ..interfaces import Conditioning
from ..registry import ReaudioError
from .components import torch_module


class VaeObjective(nn.Module):
    """Mel reconstruction (L1 or L2, mean per element) + ``kl_weight`` x KL.

    The KL is summed over latent elements and averaged over the batch, then divided by the mel
    elements per clip, so that ``kl_weight`` has the reference's meaning (AudioLDM: sum-reconstruction
    per clip + 1e-6 x sum-KL per clip). The reference's learned output log-variance and LPIPS-style
    perceptual term are left out; its discriminator is optional (``adversarial_weight`` > 0: a
    :class:`MelDiscriminator` on the log-mel, hinge losses, the generator term scaled by the reference's
    adaptive weight ``|grad recon| / |grad adv|`` at the decoder's last layer).
    """

    def __init__(self, decoder, recon: str, kl_weight: float, adversarial_weight: float = 0.0):
        super().__init__()
        if recon not in ("l1", "l2"):
            raise ReaudioError(f"training.recon_loss must be l1 or l2, got {recon!r}")
        if not callable(getattr(decoder, "posterior", None)):
            raise ReaudioError(f"decoder {type(decoder).__name__} has no posterior(mel) method: the vae stage trains "
                               "KL autoencoders (decoder: vae)")
        self.ae = torch_module(decoder, "decoder")
        self.__dict__["decoder"] = decoder  # not a submodule: its weights are self.ae's
        self.recon, self.kl_weight = recon, kl_weight
        self.adversarial_weight = float(adversarial_weight)
        self.disc = MelDiscriminator() if self.adversarial_weight > 0 else None

    def adversarial(self, rec: torch.Tensor, mel: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Discriminator hinge loss (on ``rec`` detached: trains only the discriminator) plus the decoder's
        adversarial term (through the discriminator with its weights detached: trains only the decoder),
        summed so that one optimizer step trains both."""
        d_real = self.disc(mel[:, None])
        d_fake = self.disc(rec.detach()[:, None])
        relu = torch.nn.functional.relu
        d_loss = relu(1.0 - d_real).mean() + relu(1.0 + d_fake).mean()
        frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
        g_adv = -torch.func.functional_call(self.disc, frozen, (rec[:, None],)).mean()
        last = self.ae.decoder.conv_out.weight
        if torch.is_grad_enabled() and last.requires_grad:
            g_rec = torch.autograd.grad(recon, last, retain_graph=True)[0]
            g_gan = torch.autograd.grad(g_adv, last, retain_graph=True)[0]
            weight = (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()
        else:
            weight = torch.ones(())
        weight = weight * self.adversarial_weight
        return weight * g_adv + d_loss, {"g_adv": g_adv.detach(), "d_loss": d_loss.detach(),
                                          "adv_weight": weight, "d_real": d_real.detach().mean(),
                                          "d_fake": d_fake.detach().mean()}

    def forward(self, batch: dict, seed: int) -> dict:
        mel = batch["mel"]
        g = torch.Generator(device=mel.device).manual_seed(seed)
        posterior = self.decoder.posterior(mel)  # [B, 1, T, 64] through self.ae's encoder
        z = posterior.sample(generator=g)
        rec = self.ae.decode(z).sample.squeeze(1).float()
        err = (rec - mel).abs() if self.recon == "l1" else (rec - mel) ** 2
        recon = err.mean()
        kl = posterior.kl().float().mean() / mel[0].numel()
        out = {"loss": recon + self.kl_weight * kl, "recon": recon.detach(), "kl": kl.detach()}
        if self.disc is not None:
            adv, stats = self.adversarial(rec, mel, recon)
            out = {**out, **stats, "loss": out["loss"] + adv}
        return out


class MelDiscriminator(nn.Module):
    """A patch discriminator on the log-mel ``[B, 1, T, n_mels]``: four strided 4x4 convolutions with
    spectral norm and leaky ReLU, then a 3x3 convolution to one logit per patch (about 70 ms x 10 bins at
    the 10 ms hop: real and fake are judged on local texture, such as sharp harmonics and onsets)."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 128)):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers, c = [], 1
        for i, co in enumerate(channels):
            layers += [sn(nn.Conv2d(c, co, 4, stride=2 if i < 3 else 1, padding=1)), nn.LeakyReLU(0.2)]
            c = co
        layers.append(sn(nn.Conv2d(c, 1, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        return self.net(logmel)


def timestep_range(value, num_train_timesteps: int) -> tuple[int, int] | None:
    """``training.timesteps``: null (all of ``[0, num_train_timesteps)``) or ``[lo, hi]`` with
    ``0 <= lo < hi <= num_train_timesteps``, the half-open range the LDM stage draws timesteps from."""
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or not 0 <= value[0] < value[1] <= num_train_timesteps:
        raise ReaudioError(f"training.timesteps must be null or [lo, hi] with 0 <= lo < hi <= "
                           f"{num_train_timesteps}, got {value!r}")
    return int(value[0]), int(value[1])


class LdmObjective(nn.Module):
    """Epsilon MSE on ``DDPMScheduler.add_noise`` with classifier-free guidance dropout (or, with
    ``diffusion.prediction_type: v_prediction``, the MSE to ``v = sqrt(a) eps - sqrt(1-a) x0``).

    Per batch, with probability ``drop_all`` every condition is replaced by its unconditional input;
    otherwise each sample's prompt embedding is replaced with probability ``drop_prompt``
    (reference section 5). The unconditional inputs are :func:`reaudio_core.conditioning.unconditional`'s,
    as generation guides with.
    """

    def __init__(self, denoiser, scheduler, uncond: Conditioning, drop_all: float, drop_prompt: float,
                 timesteps: tuple[int, int] | None = None):
        super().__init__()
        self.net = torch_module(denoiser, "denoiser")
        self.__dict__["denoiser"] = denoiser
        self.scheduler = scheduler
        self.uncond = uncond  # batch of one, expanded per batch
        self.drop_all, self.drop_prompt = drop_all, drop_prompt
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        # timesteps drawn uniformly from [lo, hi) (training.timesteps; a low-noise expert trains on [0, b))
        self.t_lo, self.t_hi = timesteps if timesteps is not None else (0, self.num_train_timesteps)

    def dropout(self, cond: Conditioning, g: torch.Generator) -> tuple[Conditioning, dict]:
        B, dev = cond.prompt.shape[0], cond.prompt.device
        all_ = bool(torch.rand((), generator=g, device=dev) < self.drop_all)
        per = torch.rand(B, generator=g, device=dev) < self.drop_prompt
        u = self.uncond

        def pick(c, uc, mask):
            if c is None:
                return None
            uc = uc.to(c.device).expand(B, *c.shape[1:])
            m = mask.view(B, *([1] * (c.dim() - 1)))
            return torch.where(m, uc, c)

        every = torch.full((B,), all_, device=dev)
        out = Conditioning(prompt=pick(cond.prompt, u.prompt, every | per),
                           captions=pick(cond.captions, u.captions, every),
                           caption_mask=pick(cond.caption_mask, u.caption_mask, every),
                           audio=pick(cond.audio, u.audio, every),
                           audio_mask=pick(cond.audio_mask, u.audio_mask, every))
        return out, {"dropped_all": float(all_), "dropped_prompt": float((every | per).float().mean())}

    def forward(self, batch: dict, seed: int) -> dict:
        latents = batch["latents"]
        g = torch.Generator(device=latents.device).manual_seed(seed)
        B = latents.shape[0]
        noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
        t = torch.randint(self.t_lo, self.t_hi, (B,), generator=g, device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        cond, stats = self.dropout(batch["cond"], g)
        pred = self.denoiser(noisy, t, cond).float()
        target = (self.scheduler.get_velocity(latents, noise, t)
                  if self.scheduler.config.prediction_type == "v_prediction" else noise)
        loss = torch.nn.functional.mse_loss(pred, target.float())
        return {"loss": loss, **{k: torch.tensor(v) for k, v in stats.items()}}


class VocoderObjective(nn.Module):
    """Mel L1 between the target log-mel and the log-mel of the generated waveform, plus a
    multi-resolution STFT loss (spectral convergence + log magnitude). No discriminator: a recipe
    that trains a usable HiFi-GAN on a CPU budget, not the reference's adversarial training."""

    RESOLUTIONS = ((512, 128, 512), (1024, 256, 1024), (256, 64, 256))

    def __init__(self, vocoder, stft_weight: float):
        super().__init__()
        self.net = torch_module(vocoder, "vocoder")
        self.__dict__["vocoder"] = vocoder
        self.stft_weight = stft_weight

    @staticmethod
    def _magnitude(y: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
        spec = torch.stft(y, n_fft, hop, win, torch.hann_window(win, device=y.device), return_complex=True)
        return (spec.real ** 2 + spec.imag ** 2 + 1e-12).sqrt()

    def stft_loss(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Spectral convergence + L1 of log magnitudes, averaged over three resolutions. The log uses a
        soft floor (``log(x + 1e-5)``), so a near-silent untrained generator still gets gradients."""
        total = y.new_zeros(())
        for n_fft, hop, win in self.RESOLUTIONS:
            s_hat, s = self._magnitude(y_hat, n_fft, hop, win), self._magnitude(y, n_fft, hop, win)
            sc = torch.linalg.norm(s - s_hat) / torch.linalg.norm(s).clamp(min=1e-7)
            mag = (torch.log(s + 1e-5) - torch.log(s_hat + 1e-5)).abs().mean()
            total = total + sc + mag
        return total / len(self.RESOLUTIONS)

    @staticmethod
    def soft_log_mel(y: torch.Tensor) -> torch.Tensor:
        """The reference log-mel with ``log(x + 1e-5)`` in place of ``log(clamp(x, 1e-5))`` (same values
        above the floor; non-zero gradient below it)."""
        from .. import mel as M
        mag = M.stft_magnitude(y)
        return torch.log(torch.matmul(M.mel_basis(mag.device, mag.dtype), mag) + M.LOG_CLAMP).transpose(1, 2)

    def forward(self, batch: dict, seed: int) -> dict:
        mel, wave = batch["mel"], batch["wave"]
        y_hat = self.vocoder(mel).float()
        n = min(y_hat.shape[-1], wave.shape[-1])
        y_hat, wave = y_hat[..., :n], wave[..., :n]
        mel_hat = self.soft_log_mel(y_hat)
        t = min(mel_hat.shape[1], mel.shape[1])
        mel_l1 = (mel_hat[:, :t] - mel[:, :t]).abs().mean()
        stft = self.stft_loss(y_hat, wave) if self.stft_weight else mel_l1.new_zeros(())
        return {"loss": mel_l1 + self.stft_weight * stft, "mel_l1": mel_l1.detach(), "stft": stft.detach()}
