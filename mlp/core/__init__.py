"""The lecture in code: the computational graph's gates and their local gradients
(`gates`), layers with forward and backward side by side (`layers`), losses, the `MLP`
(`model`), update rules and schedules (`optim`), numeric against analytic gradients
(`gradcheck`), the training step (`step`), and the BLAS binding and element-wise passes
the step runs on (`blas`, `elementwise`).

May import: NumPy and the standard library only; nothing else of mlp-lab.
"""
