"""Train a few steps on given global batches; each rank takes its slice of every global batch.

Run as one process (world size 1, the whole global batch) or as W processes
(rank r takes rows r*b:(r+1)*b) with the torch.distributed environment
variables set. Rank 0 writes the final model state to OUT/state.safetensors.

    python equivalence.py DATA_DIR OUT_DIR GLOBAL_BATCH STEPS
"""
import sys
from pathlib import Path

from safetensors.torch import save_file

from srcid.data.reader import ShardLoader
from srcid.run import default_run_config
from srcid.train.trainer import Trainer


def main():
    data, out, global_batch, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    config = default_run_config("srcid", "tiny")
    config.model.transformer.dropout = 0.0  # dropout draws differ between ranks by design
    config.warm_start.mode = "off"  # both layers' losses on, so every term is compared
    config.num_workers = 0
    config.validate()
    trainer = Trainer(config, data, out, resume=False, progress=False)
    world, rank = trainer.world_size, trainer.rank
    per_rank = global_batch // world
    source = ShardLoader(data, "train", batch_size=global_batch, shuffle=False, num_workers=0)
    trainer.engine.train()
    for step, batch in enumerate(source.epoch(0)):
        if step == steps:
            break
        batch = batch.rows(0, global_batch).rows(rank * per_rank, (rank + 1) * per_rank)
        trainer.gather.sizes = [per_rank] * world
        total, _ = trainer._forward_loss(batch)
        trainer.engine.backward(total)
        trainer.engine.step()
    trainer.verify_replicas()
    if rank == 0:
        state = {k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()}
        save_file(state, str(out / "state.safetensors"))
    trainer.logger.close()
    trainer.close()


if __name__ == "__main__":
    main()
