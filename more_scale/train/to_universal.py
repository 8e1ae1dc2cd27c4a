"""DeepSpeed's ds_to_universal with data-only loads (checkpoint.data_only_loads): the conversion of a checkpoint
folder to the universal format never runs code from it. Same arguments as `python -m
deepspeed.checkpoint.ds_to_universal`."""

from deepspeed.checkpoint.ds_to_universal import main, parse_arguments

from more_scale.train.checkpoint import data_only_loads

if __name__ == "__main__":
    with data_only_loads():
        main(parse_arguments())
