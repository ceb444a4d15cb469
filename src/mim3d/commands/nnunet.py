"""``mim3d nnunet``: hand a pre-trained encoder to nnU-Net v2 (plans variant + weights file)."""

from __future__ import annotations

import argparse


def cmd_nnunet(args: argparse.Namespace) -> int:
    from mim3d.hub import resolve_encoder
    from mim3d.integrations.nnunet import write_handoff

    handoff = write_handoff(resolve_encoder(args.encoder), args.dataset,
                            configuration=args.configuration, plans_name=args.plans_name,
                            source_plans=args.source_plans, seed=args.seed,
                            patch_size=args.patch_size, batch_size=args.batch_size,
                            spacing=args.spacing)
    print(handoff.summary())
    print(f"wrote {handoff.plans} and {handoff.weights}")
    n, c, p = handoff.dataset, args.configuration, args.plans_name
    print(f"next: nnUNetv2_preprocess -d {n} -plans_name {p} -c {c}\n"
          f"      nnUNetv2_train {n} {c} FOLD -p {p} -pretrained_weights {handoff.weights}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``mim3d nnunet`` to the ``mim3d`` sub-parsers."""
    p = sub.add_parser("nnunet", help="write an nnU-Net v2 plans variant and -pretrained_weights "
                       "file for a MiM encoder",
                       description="For a dataset planned by nnU-Net (nnUNetv2_plan_and_preprocess"
                       " -d N), write $nnUNet_preprocessed/DatasetN_*/PLANS_NAME.json and "
                       "mim3d_pretrained.pth; then train with nnU-Net's own commands.")
    p.add_argument("encoder", metavar="ENCODER",
                   help="encoder .safetensors, a Hugging Face folder, or hf://OWNER/NAME[@REV]")
    p.add_argument("--dataset", required=True, help="nnU-Net dataset id (e.g. 501) or DatasetNNN_Name")
    p.add_argument("--configuration", default="3d_fullres",
                   help="nnU-Net configuration to hand off (default 3d_fullres)")
    p.add_argument("--plans-name", default="nnUNetPlans_mim3d",
                   help="identifier of the written plans, nnU-Net's -p (default nnUNetPlans_mim3d)")
    p.add_argument("--source-plans", default="nnUNetPlans",
                   help="nnU-Net plans to start from (default nnUNetPlans; e.g. nnUNetResEncUNetMPlans)")
    p.add_argument("--seed", type=int, default=0, help="seed of the decoder's initialisation")
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="patch size in nnU-Net's array order, multiples of the encoder's token "
                   "size (default: nnU-Net's, rounded down to whole tokens)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="replace nnU-Net's planned batch size")
    p.add_argument("--spacing", choices=("encoder", "nnunet"), default="encoder",
                   help="target spacing: the encoder card's when it states one (default), or "
                   "nnU-Net's planned one")
    p.set_defaults(func=cmd_nnunet)
