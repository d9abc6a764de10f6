"""`python -m avt_jax.benchmark`: see `avt_jax.benchmark`."""

from avt_jax import command_line

command_line.quiet_native_logs()  # before TensorFlow and JAX load

from avt_jax.benchmark import cli  # noqa: E402

if __name__ == '__main__':
  cli.main()
