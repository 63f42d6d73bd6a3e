from breastnet.synthetic.dataset import main

main()
