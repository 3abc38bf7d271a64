#!/usr/bin/env bash
# The tests' real data, built from where it was published (see the SOURCE.md files of the shared data folder): the ISBI 2012
# membrane set as zhixuhao/unet ships it, and a 136-image PASCAL VOC 2012 sample taken from kevinddchen/Keras-FCN's copy of
# the VOC images that are not in SBD (every 5th of the 676 sorted ids; every 5th of those 136 is validation).
# Usage: .github/shared-data.sh OUT [UNET_CHECKOUT FCN_CHECKOUT]  (without checkouts, the repositories are cloned)
set -euo pipefail
out=$1; unet=${2:-}; fcn=${3:-}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
if [ -z "$unet" ]; then
  git clone -q --depth 1 https://github.com/zhixuhao/unet "$tmp/unet" && unet=$tmp/unet
  git clone -q --depth 1 https://github.com/kevinddchen/Keras-FCN "$tmp/fcn" && fcn=$tmp/fcn
fi
m=$out/membrane
mkdir -p "$m/train/image" "$m/train/label" "$m/test"
cp "$unet"/data/membrane/train/image/*.png "$m/train/image/"
cp "$unet"/data/membrane/train/label/*.png "$m/train/label/"
find "$unet/data/membrane/test" -maxdepth 1 -name '[0-9]*.png' ! -name '*_predict.png' -exec cp {} "$m/test/" \;
v=$out/voc2012_subset/VOCdevkit/VOC2012
mkdir -p "$v/JPEGImages" "$v/SegmentationClass" "$v/ImageSets/Segmentation"
ls "$fcn/data/images_png" | sed 's/\.jpg$//' | LC_ALL=C sort | awk 'NR % 5 == 1' > "$tmp/ids"
while read -r id; do
  cp "$fcn/data/images_png/$id.jpg" "$v/JPEGImages/"
  cp "$fcn/data/labels_png/$id.png" "$v/SegmentationClass/"
done < "$tmp/ids"
cp "$tmp/ids" "$v/ImageSets/Segmentation/trainval.txt"
awk 'NR % 5 != 0' "$tmp/ids" > "$v/ImageSets/Segmentation/train.txt"
awk 'NR % 5 == 0' "$tmp/ids" > "$v/ImageSets/Segmentation/val.txt"
echo "shared data in $out: $(ls "$m/train/image" | wc -l) membrane pairs, $(wc -l < "$v/ImageSets/Segmentation/train.txt") + $(wc -l < "$v/ImageSets/Segmentation/val.txt") VOC images"
