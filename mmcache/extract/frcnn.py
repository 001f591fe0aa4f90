"""`frcnn` family: torchvision Faster R-CNN (COCO) region features, bottom-up-attention style.

Per image the top-K detections (class-agnostic NMS, score threshold, at least `min_boxes`)
are re-pooled through the RoI head, so each region's 1024-d box-head representation
belongs to its final (regressed) box. Outputs: `tokens [K,1024]`, `boxes [K,5]`
(x1, y1, x2, y2 over width/height, area over image area), `mask [K]`, `pooled [1024]`
(masked mean of the regions). An image with no detection gets one whole-image region.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import nms

from mmcache.errors import MMCacheError
from mmcache.extract.base import register_family, register_preset
from mmcache.extract.mel import masked_mean
from mmcache.extract.resnet import TorchvisionExtractor, build_torchvision, weights_enum, weights_spec

DETECTORS = {
    "fasterrcnn_resnet50_fpn": "FasterRCNN_ResNet50_FPN_Weights",
    "fasterrcnn_resnet50_fpn_v2": "FasterRCNN_ResNet50_FPN_V2_Weights",
    "fasterrcnn_mobilenet_v3_large_fpn": "FasterRCNN_MobileNet_V3_Large_FPN_Weights",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights",
}
# Detections kept before our own selection; torchvision's default per-image cap.
CANDIDATES = 100


@register_family("frcnn")
class FasterRCNNExtractor(TorchvisionExtractor):
    """Top-K region features of a torchvision Faster R-CNN.

    Config: arch (see DETECTORS), weights (enum name / path / None), seed, num_classes
    (91 = COCO), min_size / max_size (the detector's resize), regions (K), score_thresh,
    min_boxes (regions kept below the threshold when too few pass it), candidate_thresh
    (the detector's own score floor for candidates, torchvision's 0.05), nms_thresh
    (class-agnostic IoU, on top of the detector's per-class NMS), proposals (RPN boxes
    kept per image, None = the detector's default, 1000 for the ResNet-50 FPNs).
    """

    modalities = ("image",)
    options = ("arch", "weights", "seed", "num_classes", "min_size", "max_size", "regions", "score_thresh",
               "min_boxes", "candidate_thresh", "nms_thresh", "proposals")

    def __init__(self, preset: str, config: dict[str, Any], modality: str) -> None:
        super().__init__(preset, config, modality)
        cfg = self.config
        arch = cfg.setdefault("arch", "fasterrcnn_resnet50_fpn_v2")
        if arch not in DETECTORS:
            raise MMCacheError(f"preset {preset!r}: unknown detector {arch!r}; use one of {list(DETECTORS)}")
        import torchvision.models.detection as tvd

        self.enum_cls = weights_enum(DETECTORS[arch])
        cfg.setdefault("weights", "COCO_V1")
        cfg.setdefault("num_classes", 91)
        cfg.setdefault("min_size", 800)
        cfg.setdefault("max_size", 1333)
        cfg.setdefault("regions", 36)
        cfg.setdefault("score_thresh", 0.2)
        cfg.setdefault("min_boxes", 10)
        cfg.setdefault("nms_thresh", 0.5)
        cfg.setdefault("candidate_thresh", 0.05)
        if int(cfg["regions"]) < 1:
            raise MMCacheError(f"preset {preset!r}: regions must be >= 1, not {cfg['regions']}")
        self._weights_spec = weights_spec(cfg["weights"], self.enum_cls)
        extra: dict[str, int] = {}
        if cfg.get("proposals"):
            extra = {"rpn_pre_nms_top_n_test": int(cfg["proposals"]), "rpn_post_nms_top_n_test": int(cfg["proposals"])}
        # weights_backbone=None: never fetch ImageNet backbone weights behind the user's back.
        self.model = build_torchvision(
            getattr(tvd, arch), self.enum_cls, cfg["weights"], int(cfg.get("seed", 0)),
            weights_backbone=None, num_classes=int(cfg["num_classes"]),
            min_size=int(cfg["min_size"]), max_size=int(cfg["max_size"]), **extra,
        )
        self.model.eval()
        heads = self.model.roi_heads
        # Keep low-scoring candidates too: they fill up to `min_boxes` when few pass score_thresh.
        heads.score_thresh = min(float(cfg["score_thresh"]), float(cfg["candidate_thresh"]))
        heads.detections_per_img = max(CANDIDATES, int(cfg["regions"]))

    def train(self, mode: bool = True) -> Any:
        """The detector always runs as at inference (proposals and detections need no targets, normalisation
        keeps its statistics); fine-tuning still trains its weights through the region features."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def dim(self) -> int:
        """Width of each region feature and of `pooled` (the box head's representation size)."""
        return int(self.model.roi_heads.box_predictor.cls_score.in_features)

    def preprocess(self, decoded: dict[str, Any]) -> torch.Tensor:
        """Image -> RGB (torchvision's image loader) -> [3,h,w]: uint8 as it is, or float32 already at the detector's size.

        The detector's own resize (bilinear, on the [0,1] float image) runs here when it would
        at least halve the image, since then its float output is fewer bytes than the uint8
        original; otherwise the uint8 image goes to the device and is resized there. Either
        way the model sees what torchvision's `weights.transforms()` + the detector's transform give.
        """
        from torchvision.transforms.v2 import functional as TF

        img = decoded["image"]
        if getattr(img, "mode", "RGB") != "RGB":
            img = img.convert("RGB")
        x = TF.pil_to_tensor(img)
        w, h = img.size
        scale = min(int(self.config["min_size"]) / min(w, h), int(self.config["max_size"]) / max(w, h))
        if scale > 0.5:
            return x
        # A channel at a time: a float copy of a huge photo's one channel, not of all three, at once.
        resize = self.model.transform.resize
        return torch.cat([resize(c[None].float().div_(255), None)[0] for c in x])

    def collate(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        """Images keep their own sizes: a list (the detector batches and pads them itself)."""
        return list(items)

    def image_list(self, batch: list[torch.Tensor]) -> ImageList:
        """The detector's transform (normalise, resize unless `preprocess` did, pad) of a batch on the device."""
        device = self._device()
        t = self.model.transform
        images = []
        for img in batch:
            x = img.to(device, non_blocking=True)
            if x.dtype == torch.uint8:
                images.append(t.resize(t.normalize(x.float().div_(255)), None)[0])
            else:  # resized in the worker; normalising after the (linear) resize is the same up to round-off
                images.append(t.normalize(x))
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
        return ImageList(t.batch_images(images, size_divisible=t.size_divisible), sizes)

    def select(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Indices of the regions to keep: class-agnostic NMS, then those over score_thresh, topped up to min_boxes."""
        keep = nms(boxes, scores, float(self.config["nms_thresh"]))  # sorted by decreasing score
        n_conf = int((scores[keep] >= float(self.config["score_thresh"])).sum())
        n = min(int(self.config["regions"]), max(n_conf, min(int(self.config["min_boxes"]), len(keep))))
        return keep[:n]

    def forward(self, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """List of `preprocess` outputs -> tokens [B,K,d], boxes [B,K,5], mask [B,K], pooled [B,d]."""
        device = self._device()
        m = self.model
        image_list = self.image_list(batch)
        features = m.backbone(image_list.tensors)
        proposals, _ = m.rpn(image_list, features)
        detections, _ = m.roi_heads(features, proposals, image_list.image_sizes)
        k, sizes = int(self.config["regions"]), image_list.image_sizes
        chosen: list[torch.Tensor] = []
        for det, (h, w) in zip(detections, sizes, strict=True):
            idx = self.select(det["boxes"], det["scores"])
            if len(idx) == 0:
                # No detection at all: one whole-image region, so the row still describes the image.
                chosen.append(torch.tensor([[0.0, 0.0, float(w), float(h)]], device=device))
            else:
                chosen.append(det["boxes"][idx])
        # Re-pool the final boxes: the box head's 1024-d representation of exactly these regions.
        pooled_maps = m.roi_heads.box_roi_pool(features, chosen, sizes)
        feats = m.roi_heads.box_head(pooled_maps).split([len(b) for b in chosen])
        d = feats[0].shape[-1]
        tokens = torch.zeros(len(batch), k, d, device=device, dtype=feats[0].dtype)
        boxes = torch.zeros(len(batch), k, 5, device=device)
        mask = torch.zeros(len(batch), k, dtype=torch.bool, device=device)
        for i, (b, f, (h, w)) in enumerate(zip(chosen, feats, sizes, strict=True)):
            n = len(b)
            scale = torch.tensor([w, h, w, h], device=device, dtype=b.dtype)
            norm = b / scale
            area = (norm[:, 2] - norm[:, 0]) * (norm[:, 3] - norm[:, 1])
            boxes[i, :n] = torch.cat([norm, area[:, None]], dim=1).to(boxes.dtype)
            tokens[i, :n] = f
            mask[i, :n] = True
        return {"pooled": masked_mean(tokens, mask), "tokens": tokens, "mask": mask, "boxes": boxes}


register_preset("frcnn", "frcnn", arch="fasterrcnn_resnet50_fpn_v2", weights="COCO_V1", regions=36,
                score_thresh=0.2, min_boxes=10)
register_preset("frcnn-v1", "frcnn", arch="fasterrcnn_resnet50_fpn", weights="COCO_V1", regions=36,
                score_thresh=0.2, min_boxes=10)
# Tests and smoke runs: random-init MobileNet detector at a small size. Its scores are near
# uniform (about 1/91): none pass score_thresh, so candidates are kept from 0 and the
# regions come from min_boxes.
register_preset("frcnn-tiny", "frcnn", arch="fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, seed=0,
                min_size=96, max_size=128, regions=8, score_thresh=0.5, min_boxes=3, candidate_thresh=0.0,
                num_classes=5, proposals=50)
