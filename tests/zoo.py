"""Real architectures from torchvision, timm and Hugging Face transformers, built small in their
default configurations (default attention implementation, default position ids), as
``name -> (builder, input maker)``. Every builder returns a module mapping its input to [N, C]
logits; models are used in eval mode (dropout and batch statistics off)."""
from __future__ import annotations

import torch
from torch import nn


class Logits(nn.Module):
    """A Hugging Face model whose output's ``logits`` field is the result."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def images(c=3, s=32):
    return lambda n: torch.randn(n, c, s, s)


def ids(vocab=40, t=6):
    return lambda n: torch.randint(1, vocab, (n, t))


def _tv(name, **kw):
    def build():
        import torchvision.models as m
        return getattr(m, name)(num_classes=3, **kw)
    return build


def _tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                             mlp_dim=16, num_classes=3)


def _tv_swin():
    from torchvision.models.swin_transformer import SwinTransformer
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 1], num_heads=[1, 2],
                           window_size=[2, 2], num_classes=3)  # the second block shifts


def _tv_swin_v2():
    from torchvision.models.swin_transformer import (PatchMergingV2, SwinTransformer,
                                                     SwinTransformerBlockV2)
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 1], num_heads=[1, 2],
                           window_size=[2, 2], num_classes=3, block=SwinTransformerBlockV2,
                           downsample_layer=PatchMergingV2)


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3)


def _timm_bit():
    from functools import partial

    from timm.layers import GroupNormAct
    from timm.models.resnetv2 import ResNetV2
    return ResNetV2(layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), stem_chs=8, num_classes=3,
                    norm_layer=partial(GroupNormAct, num_groups=4))


def _timm_nf():
    """Weight-standardized convolutions (NF-net and BiT style) with an activation in between."""
    from timm.layers import ScaledStdConv2d, StdConv2d
    return nn.Sequential(StdConv2d(3, 4, 3, stride=2), nn.GELU(), ScaledStdConv2d(4, 4, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _timm_mixer():
    from timm.models.mlp_mixer import MlpMixer
    return MlpMixer(num_classes=3, img_size=16, patch_size=8, num_blocks=1, embed_dim=8)


def _timm_mvitv2():
    """Pooling attention (convolutions on [N * heads, ...]) with decomposed relative positions
    (tables indexed by distance, contracted with the queries by torch.einsum)."""
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
    return MultiScaleVit(MultiScaleVitCfg(depths=(1, 1), embed_dim=8, num_heads=1),
                         img_size=(32, 32), num_classes=3)


def _timm(name, **kw):
    def build():
        import timm
        return timm.create_model(name, pretrained=False, num_classes=3, **kw)
    return build


def _hf(config_name, model_name, **kw):
    def build():
        import transformers
        cfg = getattr(transformers, config_name)(num_labels=3, **kw)
        return Logits(getattr(transformers, model_name)(cfg))
    return build


_BERT = dict(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=16, max_position_embeddings=16)
_TIMM_VIT = dict(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2)

ZOO = {
    # torchvision
    "tv_resnet18": (_tv("resnet18"), images(s=16)),
    "tv_mobilenet_v3_small": (_tv("mobilenet_v3_small"), images(s=16)),
    "tv_mobilenet_v2": (_tv("mobilenet_v2", width_mult=0.25), images(s=16)),
    "tv_convnext": (lambda: _tv_convnext(), images(s=32)),
    "tv_vit": (_tv_vit, images(s=16)),
    "tv_swin": (_tv_swin, images(s=16)),
    # continuous position bias (an MLP on a fixed coordinate table), a clamped exponentiated
    # logit scale, a q, k, v bias cloned with its key part zeroed: functions of parameters alone
    "tv_swin_v2": (_tv_swin_v2, images(s=16)),
    "tv_shufflenet": (_tv("shufflenet_v2_x0_5"), images(s=16)),
    "tv_efficientnet": (_tv("efficientnet_b0"), images(s=16)),  # squeeze-excitation, SiLU
    "tv_densenet": (_tv("densenet121"), images(s=32)),  # concatenated features, eval BatchNorm
    "tv_regnet": (_tv("regnet_y_400mf"), images(s=16)),
    # timm
    "timm_resnet18": (_timm("resnet18"), images(s=16)),
    "timm_resnetv2_bit": (lambda: _timm_bit(), images(s=16)),
    "timm_scaled_std_conv": (lambda: _timm_nf(), images(s=16)),
    "timm_convnext": (_timm("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 8, 8, 8)), images(s=32)),
    "timm_vit": (_timm("vit_tiny_patch16_224", **_TIMM_VIT), images(s=16)),
    "timm_deit": (_timm("deit_tiny_patch16_224", **_TIMM_VIT), images(s=16)),
    "timm_mixer": (lambda: _timm_mixer(), images(s=16)),
    "timm_cait": (_timm("cait_xxs24_224", **_TIMM_VIT, depth_token_only=1), images(s=16)),
    "timm_beit": (_timm("beit_base_patch16_224", **_TIMM_VIT), images(s=16)),
    # rotary position embeddings, SwiGLU, q/k/v biases joined by torch.cat (as BEiT's)
    "timm_eva02": (_timm("eva02_tiny_patch14_224", **_TIMM_VIT), images(s=16)),
    # convolutional patch embedding (conv + BatchNorm, then flatten(2).transpose(1, 2)), a
    # Fourier position encoding tiled over the batch with .repeat, cross-covariance attention
    "timm_xcit": (_timm("xcit_nano_12_p16_224", **_TIMM_VIT), images(s=16)),
    "timm_mvitv2": (lambda: _timm_mvitv2(), images(s=32)),
    # a pixel embedding (a convolution) and inner attention on [N * patches, ...] rows
    "timm_tnt": (_timm("tnt_s_patch16_224", img_size=16, patch_size=8, embed_dim=8, inner_dim=4,
                       depth=1, num_heads_outer=2, num_heads_inner=1), images(s=16)),
    "timm_pvt_v2": (_timm("pvt_v2_b0", embed_dims=(8, 8, 8, 8), depths=(1, 1, 1, 1),
                          num_heads=(1, 1, 1, 1)), images(s=32)),  # spatial-reduction attention
    # BatchNorm1d (eval) on [N*T, C] token rows after each linear, attention biases
    "timm_levit": (_timm("levit_128s", img_size=32, embed_dim=(16, 24, 32), key_dim=8,
                         num_heads=(2, 2, 2), depth=(1, 1, 1)), images(s=32)),
    # window attention on [N * W, ...] with a relative position bias table; the second block
    # of the first stage shifts its windows (an attention mask per window)
    "timm_swin": (_timm("swin_tiny_patch4_window7_224", img_size=16, patch_size=4, embed_dim=8,
                        depths=(2, 1), num_heads=(1, 2), window_size=2), images(s=16)),
    "timm_swin_v2": (_timm("swinv2_tiny_window8_256", img_size=16, patch_size=4, embed_dim=8,
                           depths=(2, 1), num_heads=(1, 2), window_size=2), images(s=16)),
    "timm_mobilenetv3": (_timm("mobilenetv3_small_050"), images(s=16)),
    "timm_regnet": (_timm("regnetx_002"), images(s=16)),
    # global response norm: torch.addcmul(bias view, weight view, x * n)
    "timm_convnextv2": (_timm("convnextv2_atto", depths=(1, 1, 1, 1), dims=(8, 8, 8, 8)),
                        images(s=32)),
    "timm_repvgg": (_timm("repvgg_a0"), images(s=32)),  # parallel 3x3, 1x1 and identity branches
    # Hugging Face transformers
    "hf_bert": (_hf("BertConfig", "BertForSequenceClassification", **_BERT), ids()),
    "hf_distilbert": (_hf("DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=40,
                          dim=8, n_layers=1, n_heads=2, hidden_dim=16, max_position_embeddings=16),
                      ids()),
    "hf_gpt2": (_hf("GPT2Config", "GPT2ForSequenceClassification", vocab_size=40, n_embd=8,
                    n_layer=1, n_head=2, n_positions=16, pad_token_id=0), ids()),
    "hf_llama": (_hf("LlamaConfig", "LlamaForSequenceClassification", vocab_size=40, hidden_size=8,
                     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=16, pad_token_id=0), ids()),
    "hf_roberta": (_hf("RobertaConfig", "RobertaForSequenceClassification", pad_token_id=0,
                       **{**_BERT, "max_position_embeddings": 20}), ids()),
    "hf_opt": (_hf("OPTConfig", "OPTForSequenceClassification", vocab_size=40, hidden_size=8,
                   num_hidden_layers=1, num_attention_heads=2, ffn_dim=16, word_embed_proj_dim=8,
                   max_position_embeddings=16, pad_token_id=0), ids()),  # FFN on [N*T, d] rows
    "hf_albert": (_hf("AlbertConfig", "AlbertForSequenceClassification", embedding_size=4,
                      **{**_BERT, "num_hidden_layers": 2}), ids()),  # one layer used twice
    "hf_bart": (_hf("BartConfig", "BartForSequenceClassification", vocab_size=40, d_model=8,
                    encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                    max_position_embeddings=16, pad_token_id=0),
                lambda n: torch.cat([torch.randint(3, 40, (n, 5)), torch.full((n, 1), 2)], 1)),
    "hf_deberta_v2": (_hf("DebertaV2Config", "DebertaV2ForSequenceClassification", **_BERT), ids()),
    # DeBERTa-v3's setting: relative attention through embeddings the encoder owns and every
    # layer's attention uses
    # DeBERTa (v1) with relative attention: relative keys [1, heads, 2k, d] met by batched
    # products with the queries
    "hf_deberta_relative": (_hf("DebertaConfig", "DebertaForSequenceClassification", **_BERT,
                                relative_attention=True, pos_att_type=["c2p", "p2c"]), ids()),
    "hf_deberta_v2_relative": (_hf("DebertaV2Config", "DebertaV2ForSequenceClassification",
                                   relative_attention=True, position_buckets=4,
                                   pos_att_type=["p2c", "c2p"], **_BERT), ids()),
    # a linear written x @ W.T, and an in-place residual add on its output
    "hf_falcon": (_hf("FalconConfig", "FalconForSequenceClassification", vocab_size=40,
                      hidden_size=8, num_hidden_layers=1, num_attention_heads=2, pad_token_id=0),
                  ids()),
    "hf_gemma": (_hf("GemmaConfig", "GemmaForSequenceClassification", vocab_size=40, hidden_size=8,
                     intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=4, max_position_embeddings=16,
                     pad_token_id=0), ids()),  # RMSNorm scaled by (1 + weight)
    # relative position biases: embeddings of [T, T] buckets, views, the attention's mask,
    # computed in the first layer and used by both
    "hf_t5": (_hf("T5Config", "T5ForSequenceClassification", vocab_size=40, d_model=8, d_kv=4,
                  d_ff=16, num_layers=2, num_decoder_layers=2, num_heads=2,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
              lambda n: torch.cat([torch.randint(3, 40, (n, 5)), torch.full((n, 1), 1)], 1)),
    "hf_electra": (_hf("ElectraConfig", "ElectraForSequenceClassification", embedding_size=4,
                       **_BERT), ids()),  # embeddings projected to the hidden size
    "hf_mistral": (_hf("MistralConfig", "MistralForSequenceClassification", vocab_size=40,
                       hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, pad_token_id=0), ids()),
    "hf_phi": (_hf("PhiConfig", "PhiForSequenceClassification", vocab_size=40, hidden_size=8,
                   intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                   pad_token_id=0), ids()),  # partial rotary embedding, parallel attention and MLP
    "hf_gpt_neox": (_hf("GPTNeoXConfig", "GPTNeoXForSequenceClassification", vocab_size=40,
                        hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, pad_token_id=0), ids()),
    "hf_bloom": (_hf("BloomConfig", "BloomForSequenceClassification", vocab_size=40, hidden_size=8,
                     n_layer=1, n_head=2, pad_token_id=0), ids()),  # ALiBi, a custom GELU Function
    # class embedding [d].expand(N, 1, -1) joined to the patch tokens
    "hf_clip": (_hf("CLIPConfig", "CLIPForImageClassification", projection_dim=8,
                    vision_config=dict(image_size=16, patch_size=8, hidden_size=8,
                                       intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=2),
                    text_config=dict(vocab_size=40, hidden_size=8, intermediate_size=16,
                                     num_hidden_layers=1, num_attention_heads=2)), images(s=16)),
    "hf_dinov2": (_hf("Dinov2Config", "Dinov2ForImageClassification", image_size=16, patch_size=8,
                      hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2), images(s=16)),  # layer scale, interpolated positions
    # weight-standardized convolutions with their own padding module ('SAME', stride 2)
    "hf_bit": (_hf("BitConfig", "BitForImageClassification", hidden_sizes=[8, 8, 8, 8],
                   depths=[1, 1, 1, 1], embedding_size=8, num_groups=4, global_padding="SAME",
                   layer_type="bottleneck"), images(s=32)),
    # its positional convolution's weight under weight_norm (torch.nn.utils.parametrize)
    "hf_wav2vec2": (_hf("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", hidden_size=8,
                        intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                        num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
                        classifier_proj_size=8), lambda n: torch.randn(n, 400)),
    "hf_convnextv2": (_hf("ConvNextV2Config", "ConvNextV2ForImageClassification",
                          hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1]), images(s=32)),
    "hf_segformer": (_hf("SegformerConfig", "SegformerForImageClassification",
                         num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 8],
                         num_attention_heads=[1, 2], mlp_ratios=[2, 2], patch_sizes=[3, 3],
                         strides=[2, 2]), images(s=16)),  # attention on spatially reduced keys
    # position ids from the padding mask, padding rows read by the forward, token dropout
    "hf_esm": (_hf("EsmConfig", "EsmForSequenceClassification", vocab_size=40, hidden_size=8,
                   intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                   pad_token_id=1, mask_token_id=2, max_position_embeddings=16), ids()),
    "hf_mobilevit": (_hf("MobileViTConfig", "MobileViTForImageClassification", image_size=32,
                         hidden_sizes=[8, 8, 8], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16],
                         num_attention_heads=2), images(s=32)),  # patches unfolded into tokens
    # window attention ([N * W, ...]) with a relative position bias table, shifted windows
    "hf_swin": (_hf("SwinConfig", "SwinForImageClassification", image_size=16, patch_size=4,
                    embed_dim=8, depths=[2, 1], num_heads=[1, 2], window_size=2), images(s=16)),
    "hf_swin_v2": (_hf("Swinv2Config", "Swinv2ForImageClassification", image_size=16,
                       patch_size=4, embed_dim=8, depths=[2, 1], num_heads=[1, 2], window_size=2),
                   images(s=16)),
    "hf_vit": (_hf("ViTConfig", "ViTForImageClassification", image_size=16, patch_size=8,
                   hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=16), images(s=16)),
    # torch.nn
    "nn_transformer_encoder": (lambda: nn.Sequential(
        nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1),
        nn.Flatten(), nn.Linear(48, 3)), lambda n: torch.randn(n, 6, 8)),
    "nn_lstm": (lambda: LSTMHead(), lambda n: torch.randn(n, 5, 4)),
}


class LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.gru = nn.GRU(6, 5)  # sequence-first
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h, _ = self.rnn(x)
        h, _ = self.gru(h.transpose(0, 1))
        return self.head(h[-1])


def build(name: str, n: int, seed: int = 0):
    """Model (float64, eval mode), inputs and targets for zoo entry ``name``."""
    torch.manual_seed(seed)
    make_model, make_input = ZOO[name]
    model = make_model().double().eval()
    x = make_input(n)
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        classes = model(x).shape[1]
    return model, x, torch.randint(0, classes, (n,))
