"""Objectives for causal (long-video) models, one method each, mixed into the Trainer (`train.objective`).

    flow               (Trainer.loss_flow) one noise level per clip; a causal model attends block-causally over
                       its chunks, exactly as it will when sampling
    teacher_forcing    one sequence [context copy of every chunk | noisy copy of every chunk]: noisy chunk c
                       attends the context copies of the chunks it sees and itself (vdiff.models.causal); both copies
                       of a chunk share RoPE positions; the loss is on the noisy half. Context copies are the clean
                       latents, noised to `train.context_noise` (as the sampler's history is). Clips that turn
                       (data.switch_prob) are laid out as the sampler's prompt switch re-caches (`_text_switch`)
    diffusion_forcing  every chunk gets its own noise level; chunks attend each other block-causally; loss on all

Every random draw comes from the sample's own generator (`Trainer.sample_draws`), as for `flow`, so runs stay exact
under resume and any process count.
"""

from __future__ import annotations

from typing import Any

import torch

from vdiff.diffusion.flow import add_noise, flow_loss, timesteps_of


class CausalObjectives:
    """Trainer methods for the causal objectives (needs the Trainer's model, recipe, device and helpers)."""

    def _chunks_of(self, x0: torch.Tensor) -> tuple[int, int]:
        """(chunks, latent frames per chunk) of latents x0 (B, C, F, H, W)."""
        causal = self.model_config.causal
        f = causal.chunk_frames
        if x0.shape[2] % f:
            raise ValueError(f"train: {x0.shape[2]} latent frames do not divide into chunks of "
                             f"model.causal.chunk_frames={f}")
        return x0.shape[2] // f, f

    def _tokens_per_latent_frame(self, x0: torch.Tensor) -> int:
        t, h, w = self.accelerator.unwrap_model(self.model).token_grid(x0.shape[2:])
        return h * w * t // x0.shape[2]

    def loss_teacher_forcing(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        """Predict v of the noisy copy of every chunk, each attending the context copies of earlier chunks."""
        with torch.no_grad():
            x0, text = self.clean_inputs(batch)  # (B, C, F, H, W), (B, S, dim)
            n, f = self._chunks_of(x0)
            noise, s, text, ctx_eps = self.sample_draws(batch, step, x0, text, context=True)
            s = s[:, 0]  # (B,) one level for the noisy copy
            c = self.recipe.train.context_noise
            x_ctx = add_noise(x0, ctx_eps, torch.full_like(s, c))  # context copies at the sampler's level
            x_in = torch.cat([x_ctx, add_noise(x0, noise, s)], dim=2)  # (B, C, 2F, H, W)
            per_frame = self._tokens_per_latent_frame(x0)
            t_ctx = timesteps_of(torch.full_like(s, c))[:, None].expand(-1, x0.shape[2] * per_frame)
            t_noisy = timesteps_of(s)[:, None].expand(-1, x0.shape[2] * per_frame)
            t_tokens = torch.cat([t_ctx, t_noisy], dim=1)  # (B, L) per-token timesteps
            chunks = [(j, True) for j in range(n)] + [(j, False) for j in range(n)]
            switch = self._text_switch(batch, text, n, per_frame * f)
            weight = self._chunk_weights(switch, x0.shape[0], n, x0.device)
        v = self.model_forward(x_in, t_tokens, text, chunks, switch and switch[:2])[:, :, x0.shape[2]:]  # noisy half
        if weight is not None:
            weight = weight.repeat_interleave(f, dim=1)[:, None, :, None, None]  # (B, 1, F, 1, 1)
        return flow_loss(v, x0, noise, weight)  # left-out chunks add 0; the mean stays over all

    def _chunk_weights(self, switch: tuple | None, b: int, n: int, device: torch.device) -> torch.Tensor | None:
        """Loss weight per noisy chunk (B, n), or None when every chunk weighs 1: 0 for the chunks a turned clip
        leaves out (before its turn), train.switch_weight for the first chunk after the turn,
        train.first_chunk_weight for chunk 0 of a clip that keeps it."""
        tc = self.recipe.train
        if switch is None and tc.first_chunk_weight == 1.0:
            return None
        keep = switch[2] if switch is not None else torch.ones(b, n, dtype=torch.bool, device=device)
        w = keep.float()
        w[:, 0] *= tc.first_chunk_weight
        if switch is not None:
            first_after = keep & ~torch.cat([torch.ones_like(keep[:, :1]), keep[:, :-1]], dim=1)  # (B, n)
            w = torch.where(first_after, torch.full_like(w, tc.switch_weight), w)
        return w

    def _text_switch(self, batch: dict[str, Any], text: torch.Tensor, n: int,
                     chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Clips that turn (data.switch_prob), laid out as the sampler sees a prompt switch: at the turn it re-commits
        the chunks its cache holds under the new prompt (vdiff.streaming, LongLive's KV re-cache), so from the turn
        on every context chunk is keyed by the new caption, the ones from before the turn included. Here: the
        context copies of a turned clip all attend its new direction's caption, the noisy copies from the turn on
        do too, and the loss leaves out the noisy chunks before the turn (no sampler state has old-prompt chunks
        over re-cached context). Returns (the new caption's embeddings (B, S, dim), the tokens (B, L) of the
        [context | noisy] sequence that attend it, the noisy chunks (B, n) the loss keeps), or None when no clip of
        the batch turns. A clip whose caption was dropped (CFG) keeps the empty caption throughout and all its
        chunks."""
        world = self.switch_world
        if world is None:
            return None
        turns = [world.switch(int(i)) for i in batch["index"]]
        if all(t is None for t in turns):
            return None
        per = self.model_config.causal.chunk_frames * self.vae.stride[0]  # pixel frames per chunk
        second = self.encode_text([world.caption_at(int(i), world.render_kwargs["num_frames"] - 1)
                                   for i in batch["index"]]).to(text.dtype)
        dropped = (text == self.empty_text.to(text.dtype)).flatten(1).all(1)  # (B,) the caption was dropped
        second = torch.where(dropped[:, None, None], text, second)
        first_turned = torch.tensor([n if t is None else t[0] // per for t in turns], device=text.device)
        first_turned = torch.where(dropped, n, first_turned)  # (B,) n: no turn
        turned = first_turned < n
        chunk = torch.arange(n, device=text.device)
        after = chunk[None] >= first_turned[:, None]  # (B, n) noisy chunks from the turn on
        on_second = torch.cat([turned[:, None].expand(-1, n), after], dim=1)  # (B, 2n) [context | noisy]
        keep = after | ~turned[:, None]  # (B, n)
        return second, on_second.repeat_interleave(chunk_tokens, dim=1), keep

    def loss_diffusion_forcing(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        """Every chunk at its own noise level, all attending block-causally; loss on every chunk."""
        with torch.no_grad():
            x0, text = self.clean_inputs(batch)
            n, f = self._chunks_of(x0)
            noise, s, text, _ = self.sample_draws(batch, step, x0, text, levels=n)  # s (B, n): a level per chunk
            s_frames = s.repeat_interleave(f, dim=1)  # (B, F)
            x_s = (1 - s_frames)[:, None, :, None, None] * x0 + s_frames[:, None, :, None, None] * noise
            per_frame = self._tokens_per_latent_frame(x0)
            t_tokens = timesteps_of(s_frames).repeat_interleave(per_frame, dim=1)  # (B, L)
        v = self.model_forward(x_s, t_tokens, text)
        return flow_loss(v, x0, noise)
