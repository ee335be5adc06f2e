"""Checkpoints from elsewhere, as folders memvol reads (`config.json` +
`diffusion_pytorch_model.safetensors`, module folders) and writes.

    folders       the folder: read, write, check, hash (no torch, no pickle)
    mapping       what every format shares: spec rows applied to a state dict, layout changes
    diffusers     UNet2DModel folders <-> memvol's UNet; diffusers checkpoints
    pytorch_ddpm  w86763777/pytorch-ddpm (PIA / SecMI victims) -> UNet2DModel folders
    hasegawa      Hasegawa & Yasuda's UNet -> UNet2DModel folders
    edm           NVlabs/edm and DiffMemorize networks <-> SongUNet folders
    networks      a folder as a Flax network and params, and back (the one JAX module)

Every module but networks is numpy over dictionaries: scripts/convert_torch_checkpoint.py
reads a torch checkpoint (torch only there), hands numpy state dicts to a source format's
`to_folder`, and writes the folder with folders.write.

A source format is one module with NAME (its --format), EXPECTED (what its file is, for
messages), its config translator (the source's own config -> the folder's config.json), its
spec (mapping.Spec rows: source key, folder key, source shape, layout change; applied by
mapping.map_state, which refuses missing, misshapen and unexpected parameters by name), its
refusals of what memvol cannot express (ValueError naming the field), and
`to_folder(state, ...) -> (folder state, folder config)`. Adding one (ADM, iDDPM, another
DDPM++ variant): write the module here, add it to SOURCES below, and give the converter's
READERS the few lines that open its file with torch (torch.load and picking the weights).
A format whose network memvol's UNet or SongUNet cannot express also needs a Flax model
(memvol/models) and its folder kind in networks.model_from_config.
"""

from memvol.interop import diffusers, edm, hasegawa, pytorch_ddpm

SOURCES = {m.NAME: m for m in (diffusers, pytorch_ddpm, hasegawa, edm)}  # --format -> module
