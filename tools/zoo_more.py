"""The zoo's second wave: 43 more Hugging Face architectures and 34 more torchvision / timm models.

Suites ``hf-more`` and ``vision-more`` of `zoo_clients` (same checks, same table); kept apart from ``hf`` and
``vision`` so that each run stays within minutes. What they found (2026-12-01) became fixes with tests of their
kind: an empty-batch layer call (Keypoint R-CNN), an fx.wrap'd in-place helper dropped by dead-code elimination and
position tables taken for hidden weights (MViT v2), layers tied to one weight (Zamba), tiled_svd records (RegNet,
SAM, UperNet with the default methods), partial captures with no layer (EnCodec), the culprit a trace error names
(Longformer, EnCodec), eval-mode dropout in the keep check (SpeechT5).

Suite ``hf-moe`` (`HF_MOE`, 2026-12-01): mixtures of experts whose experts are stacked 3-D weights, which fxdecomp
lowers to one Linear per expert (`fxdecomp.capture.experts`); before, they were neither counted nor decomposed.

    python tools/zoo_clients.py --suite hf-moe --budgets 0.5
    python tools/zoo_clients.py --suite hf-more --budgets 0.5 --time-limit 3600
    /work/venv-vision/bin/python tools/zoo_clients.py --suite vision-more --budgets 0.5 --time-limit 3600
"""

from __future__ import annotations

import torch

from zoo_clients import IMAGE, SMALL, _causal, _encoder, _timm, _tv

NOVOCAB = {k: v for k, v in SMALL.items() if k != "vocab_size"}


def _gen(config_name, model_name, inputs, config_kw=None, **kw):
    """Generic: getattr(transformers, model_name)(Config(**kw)), inputs() -> tuple."""

    def build():
        import transformers

        config = getattr(transformers, config_name)(**kw)
        return getattr(transformers, model_name)(config).eval(), inputs()

    return build


# The tower configs of a two-tower text / image model (CLIP, SigLIP): inputs (token ids, an image).
_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
             max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)


def _text_image(config_name, model_name, **kw):
    def build():
        import transformers

        config = getattr(transformers, config_name)(text_config=_TEXT, vision_config=_VISION, **kw)
        return getattr(transformers, model_name)(config).eval(), (torch.randint(0, 256, (1, 16)), torch.randn(1, 3, 32, 32))

    return build


def _whisper():
    import transformers

    config = transformers.WhisperConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                        max_source_positions=32, max_target_positions=32, num_mel_bins=80, vocab_size=256,
                                        decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    return model, (torch.randn(1, 80, 64), None, torch.randint(0, 256, (1, 6)))


def _speech2text():
    import transformers

    config = transformers.Speech2TextConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=256,
                                            max_source_positions=64, max_target_positions=32, input_feat_per_channel=16,
                                            conv_channels=32, num_conv_layers=2, conv_kernel_sizes=(5, 5), input_channels=1,
                                            pad_token_id=0, decoder_start_token_id=2)
    model = transformers.Speech2TextForConditionalGeneration(config).eval()
    return model, (torch.randn(1, 40, 16), torch.ones(1, 40, dtype=torch.long), torch.randint(0, 256, (1, 6)))


def _speecht5():
    import transformers

    config = transformers.SpeechT5Config(hidden_size=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                         decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=256,
                                         num_mel_bins=16, speech_decoder_prenet_units=32, speech_decoder_postnet_layers=2,
                                         speech_decoder_postnet_units=32, max_text_positions=64, max_speech_positions=64,
                                         encoder_max_relative_position=16)
    model = transformers.SpeechT5ForTextToSpeech(config).eval()
    return model, (torch.randint(0, 256, (1, 12)), torch.ones(1, 12, dtype=torch.long), torch.randn(1, 8, 16))


def _sam_vision():
    import transformers

    config = transformers.SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, image_size=64,
                                          patch_size=8, output_channels=16, window_size=4, global_attn_indexes=[1], num_pos_feats=8)
    return transformers.SamVisionModel(config).eval(), IMAGE(64)


def _dpt():
    import transformers

    config = transformers.DPTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                    intermediate_size=128, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32],
                                    fusion_hidden_size=32, head_in_index=-1, reassemble_factors=[4, 2, 1, 0.5])
    return transformers.DPTForDepthEstimation(config).eval(), IMAGE(32)


def _upernet():
    import transformers

    backbone = transformers.ConvNextConfig(hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], num_stages=4,
                                           out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.UperNetConfig(backbone_config=backbone, hidden_size=32, auxiliary_in_channels=32, auxiliary_channels=16,
                                        num_labels=3, use_auxiliary_head=False, pool_scales=[1, 2])
    return transformers.UperNetForSemanticSegmentation(config).eval(), IMAGE(64)


def _patchtst():
    import transformers

    config = transformers.PatchTSTConfig(num_input_channels=3, context_length=32, patch_length=8, patch_stride=8, d_model=32,
                                         num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, prediction_length=8)
    return transformers.PatchTSTForPrediction(config).eval(), (torch.randn(1, 32, 3),)


def _llava():
    import transformers

    vision = transformers.CLIPVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                           image_size=32, patch_size=8)
    text = transformers.LlamaConfig(num_key_value_heads=2, max_position_embeddings=64, **{**SMALL, "vocab_size": 320})
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=300, projector_hidden_act="gelu",
                                      vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=16)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    ids = torch.randint(0, 256, (1, 24))
    ids[0, 2:18] = 300  # 16 image tokens (4x4 patches, CLS dropped)
    return model, (ids, torch.randn(1, 3, 32, 32))


HF_MORE = {
    "gemma3-text": _causal("Gemma3TextConfig", num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=8,
                           **SMALL),
    "qwen3": _causal("Qwen3Config", num_key_value_heads=2, head_dim=16, max_position_embeddings=64, **SMALL),
    "qwen3-moe": _causal("Qwen3MoeConfig", num_key_value_heads=2, head_dim=16, max_position_embeddings=64, num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, **SMALL),
    "deepseek-v3": _causal("DeepseekV3Config", num_key_value_heads=4, max_position_embeddings=64, kv_lora_rank=16, q_lora_rank=32,
                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                           n_group=1, topk_group=1, moe_intermediate_size=32, first_k_dense_replace=1, n_shared_experts=1,
                           **SMALL),
    "cohere": _causal("CohereConfig", num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=64, **SMALL),
    "jamba": _causal("JambaConfig", num_key_value_heads=2, max_position_embeddings=64, num_experts=2, num_experts_per_tok=1,
                     attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
                     mamba_dt_rank=8, use_mamba_kernels=False, **SMALL),
    "recurrent-gemma": _causal("RecurrentGemmaConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=1, intermediate_size=128, vocab_size=256, lru_width=64, attention_window_size=8,
                               block_types=["recurrent", "attention"], head_dim=16),
    "rwkv": _causal("RwkvConfig", hidden_size=64, num_hidden_layers=2, vocab_size=256, attention_hidden_size=64,
                    intermediate_size=128, context_length=64, use_cache=False),
    "falcon-mamba": _causal("FalconMambaConfig", hidden_size=64, num_hidden_layers=2, vocab_size=256, state_size=8,
                            use_mambapy=False),
    "modernbert": _encoder("ModernBertConfig", "ModernBertModel", max_position_embeddings=64, local_attention=8, global_attn_every_n_layers=2,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                           **SMALL),
    "electra": _encoder("ElectraConfig", "ElectraModel", embedding_size=32, max_position_embeddings=64, **SMALL),
    "xlm-roberta": _encoder("XLMRobertaConfig", "XLMRobertaModel", max_position_embeddings=64, **SMALL),
    "mpnet": _encoder("MPNetConfig", "MPNetModel", max_position_embeddings=64, **SMALL),
    "funnel": _encoder("FunnelConfig", "FunnelModel", d_model=64, n_head=4, d_head=16, d_inner=128, block_sizes=[1, 1],
                       num_decoder_layers=1, vocab_size=256),
    "clip-text": _encoder("CLIPTextConfig", "CLIPTextModel", max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0, **SMALL),
    "clip": _text_image("CLIPConfig", "CLIPModel", projection_dim=32),
    "siglip": _text_image("SiglipConfig", "SiglipModel"),
    "whisper": _whisper,
    "speech2text": _speech2text,
    "speecht5-tts": _speecht5,
    "sam-vision": _sam_vision,
    "dpt": _dpt,
    "upernet-convnext": _upernet,
    "patchtst": _patchtst,
    "llava": _llava,
}


def _qwen2vl():
    import transformers

    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                vocab_size=320, max_position_embeddings=128, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=300, video_token_id=301,
                                        vision_start_token_id=302, vision_end_token_id=303)
    model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    grid = torch.tensor([[1, 4, 4]])  # 16 patches -> 4 merged tokens
    pixel_values = torch.randn(16, 3 * 2 * 4 * 4)
    ids = torch.randint(0, 256, (1, 12))
    ids[0, 2] = 302; ids[0, 3:7] = 300; ids[0, 7] = 303
    mm = (ids == 300).int()  # 1 marks image tokens
    return model, (ids, None, None, None, None, None, None, pixel_values, None, grid, None, mm)


def _blip():
    import transformers

    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
                max_position_embeddings=32, encoder_hidden_size=64)
    vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)
    config = transformers.BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    model = transformers.BlipForConditionalGeneration(config).eval()
    return model, (torch.randn(1, 3, 32, 32), torch.randint(0, 256, (1, 10)))


def _pix2struct():
    import transformers

    text = dict(hidden_size=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, vocab_size=256, relative_attention_num_buckets=8)
    vision = dict(hidden_size=64, patch_embed_hidden_size=48, d_ff=128, d_kv=16, num_hidden_layers=1, num_attention_heads=4,
                  seq_len=64, relative_attention_num_buckets=8)
    config = transformers.Pix2StructConfig(text_config=text, vision_config=vision)
    model = transformers.Pix2StructForConditionalGeneration(config).eval()
    patches = torch.randn(1, 16, 2 + 48)
    patches[..., 0] = torch.arange(16).div(4, rounding_mode="floor") + 1
    patches[..., 1] = torch.arange(16) % 4 + 1
    return model, (patches, torch.ones(1, 16), torch.randint(0, 256, (1, 6)))


def _mask2former():
    import transformers

    backbone = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
                                       window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, mask_feature_size=32, feature_size=32,
                                            encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=64,
                                            num_queries=8, num_labels=3, encoder_feedforward_dim=64, common_stride=4,
                                            use_timm_backbone=False, use_pretrained_backbone=False)
    return transformers.Mask2FormerForUniversalSegmentation(config).eval(), IMAGE(64)


def _tst():
    import transformers

    config = transformers.TimeSeriesTransformerConfig(prediction_length=4, context_length=8, lags_sequence=[1, 2], d_model=32,
                                                     encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                     num_time_features=1, input_size=1)
    model = transformers.TimeSeriesTransformerModel(config).eval()
    past = 8 + 2
    return model, (torch.randn(1, past), torch.randn(1, past, 1), torch.ones(1, past), None, None, torch.randn(1, 4),
                   torch.randn(1, 4, 1))


def _encodec():
    import transformers

    config = transformers.EncodecConfig(hidden_size=32, num_filters=8, num_residual_layers=1, upsampling_ratios=[4, 2],
                                        codebook_size=64, codebook_dim=32, target_bandwidths=[1.5], sampling_rate=800,
                                        audio_channels=1, num_lstm_layers=1)
    return transformers.EncodecModel(config).eval(), (torch.randn(1, 1, 256),)


_HF_MORE2 = {
    "zamba": _causal("ZambaConfig", num_key_value_heads=4, max_position_embeddings=64, attn_layer_period=3, attn_layer_offset=2,
                     mamba_d_state=8, mamba_dt_rank=8, attention_hidden_size=128, attention_head_dim=32, mamba_expand=2,
                     use_mamba_kernels=False, **{**SMALL, "num_hidden_layers": 6}),
    "mamba2": _causal("Mamba2Config", hidden_size=64, num_hidden_layers=2, vocab_size=256, state_size=8, num_heads=8, head_dim=16,
                      n_groups=1, expand=2, chunk_size=8),
    "deepseek-v2": _causal("DeepseekV2Config", num_key_value_heads=4, max_position_embeddings=64, kv_lora_rank=16, q_lora_rank=None,
                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, first_k_dense_replace=1, n_shared_experts=1, **SMALL),
    "qwen2-vl": _qwen2vl,
    "blip-caption": _blip,
    "pix2struct": _pix2struct,
    "mask2former": _mask2former,
    "time-series-transformer": _tst,
    "encodec": _encodec,
    "convbert": _encoder("ConvBertConfig", "ConvBertModel", embedding_size=32, max_position_embeddings=64, conv_kernel_size=3,
                         head_ratio=2, **SMALL),
    "squeezebert": _encoder("SqueezeBertConfig", "SqueezeBertModel", embedding_size=64, max_position_embeddings=64, q_groups=2,
                            k_groups=2, v_groups=2, post_attention_groups=2, intermediate_groups=4, output_groups=4, **SMALL),
    "mobilevitv2": _encoder("MobileViTV2Config", "MobileViTV2Model", lambda: IMAGE(64), image_size=64, width_multiplier=0.25),
    "efficientnet": _encoder("EfficientNetConfig", "EfficientNetModel", lambda: IMAGE(64), image_size=64, width_coefficient=0.25,
                             depth_coefficient=0.25, hidden_dim=320),
    "regnet": _encoder("RegNetConfig", "RegNetModel", lambda: IMAGE(64), embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                       groups_width=8),
    "videomae": _encoder("VideoMAEConfig", "VideoMAEModel", lambda: (torch.randn(1, 4, 3, 32, 32),), image_size=32, patch_size=8,
                         num_frames=4, tubelet_size=2, **NOVOCAB),
    "wavlm": _encoder("WavLMConfig", "WavLMModel", lambda: (torch.randn(1, 1600),), hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_buckets=32, max_bucket_distance=64),
    "xlnet": _encoder("XLNetConfig", "XLNetModel", d_model=64, n_layer=2, n_head=4, d_inner=128, vocab_size=256),
    "longformer": _encoder("LongformerConfig", "LongformerModel", max_position_embeddings=80, attention_window=[8, 8],
                           pad_token_id=1, **SMALL),
}
HF_MORE.update(_HF_MORE2)

# Mixtures of experts, for the stacked (3-D) expert weights fxdecomp lowers to one Linear per expert (2026-12-01):
# gated and not, with biases (GPT-OSS), shared experts (Qwen2-MoE, OLMoE-style), MLA attention beside them.
_MOE = dict(num_key_value_heads=2, max_position_embeddings=64, **SMALL)
HF_MOE = {
    "mixtral-moe": _causal("MixtralConfig", num_local_experts=4, num_experts_per_tok=2, **_MOE),
    "qwen3-moe": HF_MORE["qwen3-moe"],
    "deepseek-v3": HF_MORE["deepseek-v3"],
    "jamba": HF_MORE["jamba"],
    "qwen2-moe": _causal("Qwen2MoeConfig", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64, **_MOE),
    "olmoe": _causal("OlmoeConfig", num_experts=4, num_experts_per_tok=2, **_MOE),
    "phimoe": _causal("PhimoeConfig", num_local_experts=4, num_experts_per_tok=2, **_MOE),
    "granitemoe": _causal("GraniteMoeConfig", num_local_experts=4, num_experts_per_tok=2, **_MOE),
    "gpt-oss": _causal("GptOssConfig", num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"], **_MOE),
    "dbrx": _causal("DbrxConfig", d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=256,
                    attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}, ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2}),
    "llama4-text": _causal("Llama4TextConfig", num_local_experts=4, num_experts_per_tok=1, head_dim=16,
                           intermediate_size_mlp=128, no_rope_layers=[1, 1], **_MOE),
    "glm4-moe": _causal("Glm4MoeConfig", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16, **_MOE),
    "ernie4.5-moe": _causal("Ernie4_5_MoeConfig", moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=0,
                            **_MOE),
    "jetmoe": _causal("JetMoeConfig", num_local_experts=4, num_experts_per_tok=2, kv_channels=16, **{k: v for k, v in SMALL.items()}),
}




# ---- torchvision / timm ------------------------------------------------------------------------




def _det(name, size=128, **kw):
    return _tv(name, size=size, weights_backbone=None, min_size=size, max_size=size, **kw)


def _raft():
    import torchvision

    model = torchvision.models.optical_flow.raft_small(weights=None).eval()
    return model, (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128))


def _video(name, frames=4, size=32, **kw):
    def build():
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=10, **kw).eval()
        return model, (torch.randn(1, 3, frames, size, size),)

    return build


def _mvit_small():
    from torchvision.models.video import mvit

    original = mvit._mvit

    def small(**kw):  # mvit_v2_s hard-codes spatial_size=(224, 224); 64 px, 4 frames here
        kw.update(spatial_size=(64, 64), temporal_size=4)
        return original(**kw)

    mvit._mvit = small
    try:
        model = mvit.mvit_v2_s(weights=None, num_classes=10).eval()
    finally:
        mvit._mvit = original
    return model, (torch.randn(1, 3, 4, 64, 64),)


def _cait():
    model, inputs = _timm("cait_xxs24_224", size=32, img_size=32)()
    # FlopCounterMode's module tracker asserts on a module input that requires grad without a grad_fn (cait passes
    # its cls_token Parameter to a block): the zoo's flop counter, not fxdecomp; frozen parameters avoid it
    return model.requires_grad_(False), inputs


def _maxvit_small():
    from torchvision.models.maxvit import MaxVit

    # maxvit_t's channels / depths; partition 2 so that a 64 px input divides at every stage
    model = MaxVit(input_size=(64, 64), stem_channels=64, partition_size=2, block_channels=[64, 128, 256, 512],
                   block_layers=[2, 2, 5, 2], head_dim=32, stochastic_depth_prob=0.0, num_classes=10)
    return model.eval(), (torch.randn(1, 3, 64, 64),)


VISION_MORE = {
    # torchvision
    "maskrcnn_resnet50_fpn": _det("maskrcnn_resnet50_fpn", num_classes=5, box_detections_per_img=4, rpn_post_nms_top_n_test=20),
    "keypointrcnn_resnet50_fpn": _det("keypointrcnn_resnet50_fpn", num_classes=2, num_keypoints=5, box_detections_per_img=4,
                                      rpn_post_nms_top_n_test=20),
    "fcos_resnet50_fpn": _det("fcos_resnet50_fpn", num_classes=5),
    "ssdlite320_mobilenet_v3_large": _tv("ssdlite320_mobilenet_v3_large", size=128, weights_backbone=None, num_classes=5),
    "lraspp_mobilenet_v3_large": _tv("lraspp_mobilenet_v3_large", size=64, weights_backbone=None, num_classes=3),
    "raft_small": _raft,  # 128 px: the correlation pyramid needs 16x16 feature maps
    "mvit_v2_s": _mvit_small,
    "swin3d_t": _video("swin3d_t", frames=4, size=32),
    "maxvit_small_partition": _maxvit_small,
    "googlenet": _tv("googlenet", size=64, num_classes=10, aux_logits=False, init_weights=True),
    "efficientnet_v2_s": _tv("efficientnet_v2_s", size=64, num_classes=10),
    "vgg11_bn": _tv("vgg11_bn", size=32, num_classes=10),
    "resnext50_32x4d": _tv("resnext50_32x4d", size=32, num_classes=10),
    "mnasnet0_5": _tv("mnasnet0_5", size=64, num_classes=10),
    # timm
    "timm/convnextv2_atto": _timm("convnextv2_atto", size=64),
    "timm/regnetz_b16": _timm("regnetz_b16", size=64),
    "timm/dla34": _timm("dla34", size=64),
    "timm/cspdarknet53": _timm("cspdarknet53", size=64),
    "timm/ese_vovnet19b_dw": _timm("ese_vovnet19b_dw", size=64),
    "timm/efficientformer_l1": _timm("efficientformer_l1", size=224),
    "timm/efficientformerv2_s0": _timm("efficientformerv2_s0", size=64, img_size=64),
    "timm/mobileone_s0": _timm("mobileone_s0", size=64),
    "timm/edgenext_xx_small": _timm("edgenext_xx_small", size=64),
    "timm/swinv2_cr_tiny_ns_224": _timm("swinv2_cr_tiny_ns_224", size=64, img_size=64, window_size=2),
    "timm/deit3_small_patch16_224": _timm("deit3_small_patch16_224", size=32, img_size=32),
    "timm/cait_xxs24_224": _cait,
    "timm/volo_d1_224": _timm("volo_d1_224", size=64, img_size=64),
    "timm/res2net50_26w_4s": _timm("res2net50_26w_4s", size=64),
    "timm/sequencer2d_s": _timm("sequencer2d_s", size=64, img_size=64),
    "timm/gcvit_xxtiny": _timm("gcvit_xxtiny", size=64, img_size=64),
    "timm/hgnetv2_b0": _timm("hgnetv2_b0", size=64),
    "timm/rdnet_tiny": _timm("rdnet_tiny", size=64),
    "timm/mambaout_femto": _timm("mambaout_femto", size=64),
    "timm/tinynet_a": _timm("tinynet_a", size=64),
}
