import torch, cram_ext
for dev in ["cpu", "cuda"]:
    try:
        cram_ext.gated_scan(torch.randn(2, 5, device=dev), -torch.rand(2, 5, 3, device=dev))
    except ValueError as e:
        print(dev, "ok ValueError:", e)
print("done")
