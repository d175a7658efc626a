"""Bibliography: every paper a method, the pipeline or the methods text cites.

Keys are what :class:`qsmflow.registry.Method` ``citations`` and the ``[key]`` marks of its
methods sentence use; ``tests/test_registry.py`` checks that every key a method cites is here.
"""

REFERENCES = {
    "romeo": "Dymerska B, Eckstein K, Bachrata B, et al. Phase unwrapping with a rapid "
    "opensource minimum spanning tree algorithm (ROMEO). Magn Reson Med. "
    "2021;85:2294-2308.",
    "laplacian": "Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric "
    "applications. Opt Lett. 2003;28:1194-1196.",
    "mcpc3ds": "Eckstein K, Dymerska B, Bachrata B, et al. Computationally efficient "
    "combination of multi-channel phase data from multi-echo acquisitions (ASPIRE). "
    "Magn Reson Med. 2018;79:2996-3006.",
    "wls": "Wu B, Li W, Avram AV, Gho SM, Liu C. Fast and tissue-optimized mapping of magnetic "
    "susceptibility and T2* with multi-echo and multi-shot spirals. NeuroImage. "
    "2012;59:297-305.",
    "complexfit": "Liu T, Wisnieff C, Lou M, Chen W, Spincemaille P, Wang Y. Nonlinear "
    "formulation of the magnetic field to source relationship for robust "
    "quantitative susceptibility mapping. Magn Reson Med. 2013;69:467-476.",
    "bet": "Smith SM. Fast robust automated brain extraction. Hum Brain Mapp. 2002;17:143-155.",
    "threshold": "Otsu N. A threshold selection method from gray-level histograms. IEEE Trans "
    "Syst Man Cybern. 1979;9:62-66.",
    "vsharp": "Wu B, Li W, Guidon A, Liu C. Whole brain susceptibility mapping using compressed "
    "sensing. Magn Reson Med. 2012;67:137-147.",
    "sharp": "Schweser F, Deistung A, Lehr BW, Reichenbach JR. Quantitative imaging of "
    "intrinsic magnetic tissue properties using MRI signal phase. NeuroImage. "
    "2011;54:2789-2807.",
    "pdf": "Liu T, Khalidov I, de Rochefort L, et al. A novel background field removal method "
    "for MRI using projection onto dipole fields (PDF). NMR Biomed. 2011;24:1129-1136.",
    "lbv": "Zhou D, Liu T, Spincemaille P, Wang Y. Background field removal by solving the "
    "Laplacian boundary value problem. NMR Biomed. 2014;27:312-319.",
    "resharp": "Sun H, Wilman AH. Background field removal using spherical mean value "
    "filtering and Tikhonov regularization. Magn Reson Med. 2014;71:1151-1157.",
    "tkd": "Shmueli K, de Zwart JA, van Gelderen P, Li TQ, Dodd SJ, Duyn JH. Magnetic "
    "susceptibility mapping of brain tissue in vivo using MRI phase data. Magn Reson "
    "Med. 2009;62:1510-1522.",
    "tikhonov": "Bilgic B, Chatnuntawech I, Fan AP, et al. Fast image reconstruction with "
    "L2-regularization. J Magn Reson Imaging. 2014;40:181-191.",
    "tv": "Milovic C, Bilgic B, Zhao B, Acosta-Cabronero J, Tejos C. Fast nonlinear "
    "susceptibility inversion with variational regularization. Magn Reson Med. "
    "2018;80:814-821.",
    "rts": "Kames C, Wiggermann V, Rauscher A. Rapid two-step dipole inversion for "
    "susceptibility mapping with sparsity priors. NeuroImage. 2018;167:276-283.",
    "ndi": "Polak D, Chatnuntawech I, Yoon J, et al. Nonlinear dipole inversion (NDI) enables "
    "robust quantitative susceptibility mapping (QSM). NMR Biomed. 2020;33:e4271.",
    "medi": "Liu T, Liu J, de Rochefort L, et al. Morphology enabled dipole inversion (MEDI) "
    "from a single-angle acquisition: comparison with COSMOS in human brain imaging. "
    "Magn Reson Med. 2011;66:777-783.",
    "dip": "Ulyanov D, Vedaldi A, Lempitsky V. Deep image prior. Proc IEEE CVPR. 2018:9446-9454.",
    "csf": "Straub S, Schneider TM, Emmerich J, et al. Suitable reference tissues for "
    "quantitative susceptibility mapping of the brain. Magn Reson Med. 2017;78:204-214.",
    "nipype": "Gorgolewski K, Burns CD, Madison C, et al. Nipype: a flexible, lightweight and "
    "extensible neuroimaging data processing framework in Python. Front "
    "Neuroinform. 2011;5:13.",
    "bids": "Gorgolewski KJ, Auer T, Calhoun VD, et al. The brain imaging data structure, a "
    "format for organizing and describing outputs of neuroimaging experiments. Sci "
    "Data. 2016;3:160044.",
    "modip": "Xiong Z, Gao Y, Liu Y, Fazlollahi A, Nestor P, Liu F, Sun H. Quantitative "
    "susceptibility mapping through model-based deep image prior (MoDIP). NeuroImage. "
    "2024;291:120583.",
    "inr": "Zhang M, Feng R, Li Z, et al. A subject-specific unsupervised deep learning method "
    "for quantitative susceptibility mapping using implicit neural representation. Med "
    "Image Anal. 2024;95:103173.",
    "siren": "Sitzmann V, Martel JNP, Bergman AW, Lindell DB, Wetzstein G. Implicit neural "
    "representations with periodic activation functions. Adv Neural Inf Process Syst. "
    "2020;33:7462-7473.",
    "arlo": "Pei M, Nguyen TD, Thimmappa ND, et al. Algorithm for fast monoexponential fitting "
    "based on auto-regression on linear operations (ARLO) of data. Magn Reson Med. "
    "2015;73:843-850.",
    "rician": "Gudbjartsson H, Patz S. The Rician distribution of noisy MRI data. Magn Reson Med. "
    "1995;34:910-914.",
}
