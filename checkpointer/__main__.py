from checkpointer.cli import main

main()
